//! One error type for the whole engine, carrying the user-visible error code.
//!
//! The codes are the Python API's `laminardb.codes`; the [`ErrorClass`] picks the Python
//! exception class. Messages read `"Table not found (200): trades"`.

use std::fmt;
use std::sync::Arc;

/// The numeric error codes of `laminardb.codes`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    ConnectionFailed = 100,
    ConnectionClosed = 101,
    ConnectionInUse = 102,
    TableNotFound = 200,
    TableExists = 201,
    SchemaMismatch = 202,
    InvalidSchema = 203,
    IngestionFailed = 300,
    WriterClosed = 301,
    BatchSchemaMismatch = 302,
    QueryFailed = 400,
    SqlParseError = 401,
    QueryCancelled = 402,
    SubscriptionFailed = 500,
    SubscriptionClosed = 501,
    SubscriptionTimeout = 502,
    Internal = 900,
    Shutdown = 901,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::ConnectionFailed,
        ErrorCode::ConnectionClosed,
        ErrorCode::ConnectionInUse,
        ErrorCode::TableNotFound,
        ErrorCode::TableExists,
        ErrorCode::SchemaMismatch,
        ErrorCode::InvalidSchema,
        ErrorCode::IngestionFailed,
        ErrorCode::WriterClosed,
        ErrorCode::BatchSchemaMismatch,
        ErrorCode::QueryFailed,
        ErrorCode::SqlParseError,
        ErrorCode::QueryCancelled,
        ErrorCode::SubscriptionFailed,
        ErrorCode::SubscriptionClosed,
        ErrorCode::SubscriptionTimeout,
        ErrorCode::Internal,
        ErrorCode::Shutdown,
    ];

    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The constant's name in `laminardb.codes`.
    pub fn constant_name(self) -> &'static str {
        match self {
            ErrorCode::ConnectionFailed => "CONNECTION_FAILED",
            ErrorCode::ConnectionClosed => "CONNECTION_CLOSED",
            ErrorCode::ConnectionInUse => "CONNECTION_IN_USE",
            ErrorCode::TableNotFound => "TABLE_NOT_FOUND",
            ErrorCode::TableExists => "TABLE_EXISTS",
            ErrorCode::SchemaMismatch => "SCHEMA_MISMATCH",
            ErrorCode::InvalidSchema => "INVALID_SCHEMA",
            ErrorCode::IngestionFailed => "INGESTION_FAILED",
            ErrorCode::WriterClosed => "WRITER_CLOSED",
            ErrorCode::BatchSchemaMismatch => "BATCH_SCHEMA_MISMATCH",
            ErrorCode::QueryFailed => "QUERY_FAILED",
            ErrorCode::SqlParseError => "SQL_PARSE_ERROR",
            ErrorCode::QueryCancelled => "QUERY_CANCELLED",
            ErrorCode::SubscriptionFailed => "SUBSCRIPTION_FAILED",
            ErrorCode::SubscriptionClosed => "SUBSCRIPTION_CLOSED",
            ErrorCode::SubscriptionTimeout => "SUBSCRIPTION_TIMEOUT",
            ErrorCode::Internal => "INTERNAL_ERROR",
            ErrorCode::Shutdown => "SHUTDOWN",
        }
    }

    /// Human-readable name used as the message prefix.
    pub fn title(self) -> &'static str {
        match self {
            ErrorCode::ConnectionFailed => "Connection failed",
            ErrorCode::ConnectionClosed => "Connection closed",
            ErrorCode::ConnectionInUse => "Connection in use",
            ErrorCode::TableNotFound => "Table not found",
            ErrorCode::TableExists => "Table exists",
            ErrorCode::SchemaMismatch => "Schema mismatch",
            ErrorCode::InvalidSchema => "Invalid schema",
            ErrorCode::IngestionFailed => "Ingestion failed",
            ErrorCode::WriterClosed => "Writer closed",
            ErrorCode::BatchSchemaMismatch => "Batch schema mismatch",
            ErrorCode::QueryFailed => "Query failed",
            ErrorCode::SqlParseError => "SQL parse error",
            ErrorCode::QueryCancelled => "Query cancelled",
            ErrorCode::SubscriptionFailed => "Subscription failed",
            ErrorCode::SubscriptionClosed => "Subscription closed",
            ErrorCode::SubscriptionTimeout => "Subscription timeout",
            ErrorCode::Internal => "Internal error",
            ErrorCode::Shutdown => "Shutdown",
        }
    }
}

/// Which exception family an error belongs to. Most follow from the code's range; the
/// checkpoint, connector and stream families have no code range of their own.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    ByCode,
    Checkpoint,
    Connector,
    Stream,
}

/// Where an error came from: which layer of the engine found it. The code and class (what
/// the Python API sees) follow from the constructor; the layer says what failed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Layer {
    /// The SQL text (tokens, syntax).
    Sql,
    /// Planning: names, types, shapes the engine does not run.
    Plan,
    /// Running: evaluating expressions, ingesting rows, the engine's lifecycle.
    Execution,
    /// Files: the WAL, checkpoints, spill files.
    Storage,
    /// An external system through a connector.
    Connector,
    /// A bug or a broken invariant inside the engine (including caught panics).
    Internal,
}

#[derive(Clone, Debug)]
pub struct Error {
    pub code: ErrorCode,
    pub class: ErrorClass,
    pub message: String,
    pub layer: Layer,
    /// The error this one was made from, if any (`std::error::Error::source`).
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Equal when what a user sees is equal (the source chain is not compared).
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        (self.code, self.class, &self.message, self.layer) == (other.code, other.class, &other.message, other.layer)
    }
}

impl Eq for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `code` found while running (see the constructors for the others).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error { code, class: ErrorClass::ByCode, message: message.into(), layer: Layer::Execution, source: None }
    }
    pub fn with_class(mut self, class: ErrorClass) -> Self {
        self.class = class;
        self
    }
    pub fn in_layer(mut self, layer: Layer) -> Self {
        self.layer = layer;
        self
    }
    /// Keeps `source` as the cause of this error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }
    pub fn table_not_found(name: &str) -> Self {
        Error::new(ErrorCode::TableNotFound, format!("'{name}' does not exist")).in_layer(Layer::Plan)
    }
    pub fn table_exists(name: &str) -> Self {
        Error::new(ErrorCode::TableExists, format!("'{name}' already exists")).in_layer(Layer::Plan)
    }
    pub fn invalid_schema(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::InvalidSchema, message).in_layer(Layer::Plan)
    }
    pub fn ingestion(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::IngestionFailed, message)
    }
    pub fn batch_mismatch(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::BatchSchemaMismatch, message)
    }
    /// A query the engine cannot plan (names, types, shapes).
    pub fn query(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::QueryFailed, message).in_layer(Layer::Plan)
    }
    /// A query that failed while running (an expression on some value, an overflow).
    pub fn execution(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::QueryFailed, message)
    }
    pub fn parse(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::SqlParseError, message).in_layer(Layer::Sql)
    }
    /// A bug or a broken invariant inside the engine (including caught panics).
    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Internal, message).in_layer(Layer::Internal)
    }
    /// A file of the storage directory or a spill file could not be read or written: a
    /// `CheckpointError` (900) in Python, never a query's failure.
    pub fn storage(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Internal, message).with_class(ErrorClass::Checkpoint).in_layer(Layer::Storage)
    }
    pub fn shutdown() -> Self {
        Error::new(ErrorCode::Shutdown, "the database has been shut down")
    }
    pub fn closed() -> Self {
        Error::new(ErrorCode::ConnectionClosed, "the connection is closed")
    }
    pub fn unsupported(what: impl fmt::Display) -> Self {
        Error::new(ErrorCode::QueryFailed, format!("unsupported: {what}")).in_layer(Layer::Plan)
    }
    pub fn connector(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::QueryFailed, message).with_class(ErrorClass::Connector).in_layer(Layer::Connector)
    }
    pub fn checkpoint(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Internal, message).with_class(ErrorClass::Checkpoint).in_layer(Layer::Storage)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code.title(), self.code.as_u16(), self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<arrow::error::ArrowError> for Error {
    fn from(e: arrow::error::ArrowError) -> Self {
        use arrow::error::ArrowError as A;
        match e {
            A::IoError(..) => Error::storage(e.to_string()).with_source(e),
            A::ExternalError(ref inner) if inner.downcast_ref::<Error>().is_some() => {
                let A::ExternalError(inner) = e else { unreachable!("matched above") };
                *inner.downcast::<Error>().expect("checked above")
            }
            _ => Error::execution(e.to_string()).with_source(e),
        }
    }
}

impl From<datafusion::error::DataFusionError> for Error {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        use datafusion::error::DataFusionError as D;
        match e {
            D::SQL(err, _) => Error::parse(err.to_string()),
            D::External(inner) => match inner.downcast::<Error>() {
                Ok(ours) => *ours,
                Err(other) => Error::execution(other.to_string()),
            },
            D::ArrowError(inner, _) => Error::from(*inner),
            D::IoError(inner) => Error::storage(inner.to_string()).with_source(inner),
            D::ObjectStore(inner) => Error::storage(inner.to_string()),
            D::Execution(msg) => Error::execution(readable(&msg)),
            D::ResourcesExhausted(msg) => Error::execution(readable(&msg)),
            D::Context(ctx, inner) => {
                let mut err = Error::from(*inner);
                err.message = format!("{ctx}: {}", err.message);
                err
            }
            D::Shared(inner) => Error::query(readable(&inner.to_string())),
            D::Internal(msg) => Error::internal(msg),
            other => Error::query(readable(&other.strip_backtrace())),
        }
    }
}

/// Some DataFusion messages end in a Rust debug dump of a syntax node
/// (`… non-string expr: Value(ValueWithSpan { value: Null, span: … })`): the message is
/// cut where the dump starts, which keeps what it says and drops what no user can read.
fn readable(message: &str) -> String {
    // `SQL error: ParserError("…")`: the parser's own text, without its debug wrapping.
    static WRAPPED: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let wrapped = WRAPPED.get_or_init(|| {
        regex::Regex::new(r#"\b(?:ParserError|TokenizerError)\("(.*)"\)"#).expect("valid regex")
    });
    let message = wrapped.replace_all(message, "$1");
    let message = message.as_ref();
    static DUMP: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let dump = DUMP.get_or_init(|| {
        regex::Regex::new(r"\b[A-Z][A-Za-z0-9]*(\([A-Z][A-Za-z0-9]*)? \{ [a-z_][a-z0-9_]*: ").expect("valid regex")
    });
    match dump.find(message) {
        Some(m) => format!("{} (in the statement)", message[..m.start()].trim_end().trim_end_matches(':')),
        None => message.to_string(),
    }
}

/// Turns a caught panic payload into a readable message.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each layer's errors keep the Python codes they had, say where they came from, and
    /// keep their cause; a failed file read is storage (900, CheckpointError), not 400.
    #[test]
    fn errors_say_their_layer_and_keep_their_cause() {
        assert_eq!(Error::parse("x").layer, Layer::Sql);
        assert_eq!(Error::query("x").layer, Layer::Plan);
        assert_eq!(Error::table_not_found("t").layer, Layer::Plan);
        assert_eq!(Error::internal("x").layer, Layer::Internal);
        assert_eq!(Error::connector("x").layer, Layer::Connector);
        let io = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read");
        let stored = Error::from(arrow::error::ArrowError::IoError("reading rows".into(), io));
        assert_eq!((stored.layer, stored.code, stored.class), (Layer::Storage, ErrorCode::Internal, ErrorClass::Checkpoint));
        let cause = std::error::Error::source(&stored).expect("the Arrow error is kept");
        assert!(cause.to_string().contains("reading rows"), "{cause}");
        let from_df = Error::from(datafusion::error::DataFusionError::IoError(std::io::Error::other("disk gone")));
        assert_eq!((from_df.layer, from_df.code), (Layer::Storage, ErrorCode::Internal));
        let divide = Error::from(arrow::error::ArrowError::DivideByZero);
        assert_eq!((divide.layer, divide.code), (Layer::Execution, ErrorCode::QueryFailed));
        assert!(std::error::Error::source(&divide).is_some());
        // Our own error inside DataFusion's or Arrow's comes back as it was.
        let ours = Error::table_exists("t");
        let wrapped = datafusion::error::DataFusionError::External(Box::new(ours.clone()));
        assert_eq!(Error::from(wrapped), ours);
        assert_eq!(Error::from(arrow::error::ArrowError::ExternalError(Box::new(ours.clone()))), ours);
    }

    #[test]
    fn message_names_title_and_number() {
        let e = Error::table_not_found("trades");
        assert_eq!(e.to_string(), "Table not found (200): 'trades' does not exist");
    }

    #[test]
    fn codes_are_the_api_table() {
        let pairs: Vec<(u16, &str)> =
            ErrorCode::ALL.iter().map(|c| (c.as_u16(), c.constant_name())).collect();
        assert_eq!(pairs.len(), 18);
        assert!(pairs.contains(&(302, "BATCH_SCHEMA_MISMATCH")));
        assert!(pairs.contains(&(901, "SHUTDOWN")));
    }

    #[test]
    fn debug_dumps_are_cut_from_datafusion_messages() {
        let df = datafusion::error::DataFusionError::NotImplemented(
            "Dot access not supported for non-string expr: Value(ValueWithSpan { value: Null, span: Span(Location(1,2)..Location(1,6)) })".into(),
        );
        assert_eq!(
            Error::from(df).message,
            "This feature is not implemented: Dot access not supported for non-string expr (in the statement)"
        );
        let wrapped = datafusion::error::DataFusionError::Plan(r#"SQL error: ParserError("Expected: end of statement")"#.into());
        assert_eq!(Error::from(wrapped).message, "Error during planning: SQL error: Expected: end of statement");
        let plain = datafusion::error::DataFusionError::Plan("No field named x. Valid fields are t.a.".into());
        assert_eq!(Error::from(plain).message, "Error during planning: No field named x. Valid fields are t.a.");
    }

    #[test]
    fn our_error_survives_a_trip_through_datafusion() {
        let df = datafusion::error::DataFusionError::External(Box::new(Error::table_exists("x")));
        assert_eq!(Error::from(df).code, ErrorCode::TableExists);
    }
}
