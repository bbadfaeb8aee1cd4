//! The file formats the `files` connectors read and write.

use laminardb_engine::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    /// JSON lines (a reader also takes one JSON array of objects).
    Json,
    Parquet,
}

impl Format {
    pub fn parse(name: &str) -> Result<Format> {
        match name.to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "json" | "jsonl" | "ndjson" => Ok(Format::Json),
            "parquet" => Ok(Format::Parquet),
            other => Err(Error::connector(format!("files: format '{other}' is not one of csv, json, parquet"))),
        }
    }

    /// The extension of the files written in it.
    pub fn ext(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Json => "jsonl",
            Format::Parquet => "parquet",
        }
    }
}
