//! A Nexmark event generator: the auction model of the Nexmark benchmark (persons open
//! auctions, bidders bid on them) as three sources, `person`, `auction` and `bid`.
//!
//! It follows the standard generator's model: events are numbered 0, 1, 2, … and each
//! block of 50 holds 1 person, 3 auctions and 46 bids, in that order; event `n` happens
//! at `base_time + n / rate` (in order); ids derive from the event number so the three
//! tables agree (a bid's auction and bidder exist, or will within the in-flight window);
//! bids go to a hot auction half the time and come from a hot bidder three times in
//! four; prices are log-uniform from 1 to 10⁶ cents. Randomness is a hash of the event
//! number, so every event is the same however the range is split across shards and
//! whichever table asks for it.
//!
//! Rows are produced in chunks of [`CHUNK_EVENTS`] event numbers. A nexmark source has
//! one split per shard ([`SourceConnector`]); split `s` of `n` takes chunks `s, s + n, …`,
//! so each split's event time ascends, and records the next chunk as its position.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::error::{Error, Result};
use crate::source::{offset_position, read_offset_position, SourceConnector, SplitPoll, SplitReader};

/// Event numbers per generated chunk (and so per batch of the source).
pub const CHUNK_EVENTS: u64 = 10_000;

const PERSON_PROPORTION: u64 = 1;
const AUCTION_PROPORTION: u64 = 3;
const BID_PROPORTION: u64 = 46;
const PROPORTION: u64 = PERSON_PROPORTION + AUCTION_PROPORTION + BID_PROPORTION;
const FIRST_PERSON_ID: i64 = 1000;
const FIRST_AUCTION_ID: i64 = 1000;
const FIRST_CATEGORY_ID: i64 = 10;
const CATEGORIES: u64 = 5;
const HOT_AUCTION_RATIO: u64 = 2;
const HOT_BIDDER_RATIO: u64 = 4;
const HOT_SELLER_RATIO: u64 = 4;
/// Hot ids are multiples of this (the standard generator's "hot" granularity).
const HOT_GROUP: i64 = 100;
/// Bids and auctions refer to one of the most recent this-many persons / auctions.
const ACTIVE_PEOPLE: i64 = 1000;
const IN_FLIGHT_AUCTIONS: i64 = 100;
const CHANNELS: [&str; 4] = ["Google", "Facebook", "Baidu", "Apple"];
const URLS: [&str; 4] = [
    "https://www.nexmark.com/Google/item.htm?query=1",
    "https://www.nexmark.com/Facebook/item.htm?query=1",
    "https://www.nexmark.com/Baidu/item.htm?query=1",
    "https://www.nexmark.com/Apple/item.htm?query=1",
];
const FIRST_NAMES: [&str; 6] = ["Peter", "Paul", "Luke", "John", "Saul", "Vicky"];
const LAST_NAMES: [&str; 6] = ["Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton"];
const US_STATES: [&str; 6] = ["AZ", "CA", "ID", "OR", "WA", "WY"];
const US_CITIES: [&str; 6] = ["Phoenix", "Los Angeles", "San Francisco", "Boise", "Portland", "Bend"];

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Table {
    Person,
    Auction,
    Bid,
}

impl Table {
    fn parse(name: &str) -> Result<Table> {
        match name.to_ascii_lowercase().as_str() {
            "person" => Ok(Table::Person),
            "auction" => Ok(Table::Auction),
            "bid" => Ok(Table::Bid),
            other => Err(Error::connector(format!("nexmark table '{other}' is not one of person, auction, bid"))),
        }
    }

    /// The table's columns, as the standard Nexmark schema names them.
    pub fn schema(self) -> SchemaRef {
        let ts = || DataType::Timestamp(TimeUnit::Millisecond, None);
        let f = |name: &str, t: DataType| Field::new(name, t, false);
        Arc::new(Schema::new(match self {
            Table::Person => vec![
                f("id", DataType::Int64),
                f("name", DataType::Utf8),
                f("email_address", DataType::Utf8),
                f("credit_card", DataType::Utf8),
                f("city", DataType::Utf8),
                f("state", DataType::Utf8),
                f("date_time", ts()),
                f("extra", DataType::Utf8),
            ],
            Table::Auction => vec![
                f("id", DataType::Int64),
                f("item_name", DataType::Utf8),
                f("description", DataType::Utf8),
                f("initial_bid", DataType::Int64),
                f("reserve", DataType::Int64),
                f("date_time", ts()),
                f("expires", ts()),
                f("seller", DataType::Int64),
                f("category", DataType::Int64),
                f("extra", DataType::Utf8),
            ],
            Table::Bid => vec![
                f("auction", DataType::Int64),
                f("bidder", DataType::Int64),
                f("price", DataType::Int64),
                f("channel", DataType::Utf8),
                f("url", DataType::Utf8),
                f("date_time", ts()),
                f("extra", DataType::Utf8),
            ],
        }))
    }
}

/// A generator source's settings, from `WITH (connector = 'nexmark', …)`.
#[derive(Clone, Debug, PartialEq)]
pub struct NexmarkConfig {
    pub table: Table,
    /// Events of all three kinds to number (the table gets its share: 1, 3 or 46 in 50).
    pub events: u64,
    /// Event-time rate: events per second of event time.
    pub rate: u64,
    /// Event time of event 0, epoch milliseconds.
    pub base_time_ms: i64,
}

/// The option keys a nexmark source understands.
const OPTIONS: [&str; 5] = ["connector", "table", "events", "rate", "base_time_ms"];

impl NexmarkConfig {
    pub fn from_options(options: &BTreeMap<String, String>) -> Result<NexmarkConfig> {
        for key in options.keys() {
            if !OPTIONS.contains(&key.as_str()) && !key.starts_with("watermark") && !key.starts_with("retention") && key != "partition_key" {
                return Err(Error::connector(format!(
                    "nexmark source option '{key}' is not one of {}",
                    OPTIONS.join(", ")
                )));
            }
        }
        let table = Table::parse(options.get("table").map(String::as_str).ok_or_else(|| {
            Error::connector("a nexmark source needs table = 'person' | 'auction' | 'bid'")
        })?)?;
        let number = |key: &str, default: u64| -> Result<u64> {
            match options.get(key) {
                None => Ok(default),
                Some(v) => v
                    .replace('_', "")
                    .parse()
                    .map_err(|_| Error::connector(format!("nexmark option {key} = '{v}' is not a positive integer"))),
            }
        };
        let events = number("events", 10_000_000)?;
        let rate = number("rate", 10_000)?;
        if rate == 0 {
            return Err(Error::connector("nexmark option rate must be at least 1 event per second"));
        }
        let base_time_ms = number("base_time_ms", 1_436_918_400_000)? as i64;
        Ok(NexmarkConfig { table, events, rate, base_time_ms })
    }

    /// Number of chunks the event range splits into.
    pub fn chunks(&self) -> u64 {
        self.events.div_ceil(CHUNK_EVENTS)
    }

    pub fn event_time_ms(&self, event: u64) -> i64 {
        self.base_time_ms + (event as u128 * 1000 / self.rate as u128) as i64
    }

    /// How many rows of this table events `[0, events)` hold (for checking results).
    pub fn rows_total(&self) -> u64 {
        self.events / PROPORTION * self.share() + self.partial_block_rows()
    }

    fn share(&self) -> u64 {
        match self.table {
            Table::Person => PERSON_PROPORTION,
            Table::Auction => AUCTION_PROPORTION,
            Table::Bid => BID_PROPORTION,
        }
    }

    fn partial_block_rows(&self) -> u64 {
        let rest = self.events % PROPORTION;
        (0..rest).filter(|&offset| kind_of(offset) == self.table).count() as u64
    }

    /// The rows of chunk `chunk` that belong to this table (maybe none).
    pub fn chunk(&self, chunk: u64) -> Result<Option<RecordBatch>> {
        let start = chunk * CHUNK_EVENTS;
        let end = (start + CHUNK_EVENTS).min(self.events);
        if start >= end {
            return Ok(None);
        }
        let events = (start..end).filter(|&n| kind_of(n % PROPORTION) == self.table);
        let columns = match self.table {
            Table::Bid => self.bids(events),
            Table::Auction => self.auctions(events),
            Table::Person => self.persons(events),
        };
        let batch = RecordBatch::try_new(self.table.schema(), columns)?;
        Ok((batch.num_rows() > 0).then_some(batch))
    }

    /// The latest event time in chunk `chunk`.
    pub fn chunk_end_time_ms(&self, chunk: u64) -> i64 {
        let last = ((chunk + 1) * CHUNK_EVENTS).min(self.events).saturating_sub(1);
        self.event_time_ms(last)
    }

    fn bids(&self, events: impl Iterator<Item = u64>) -> Vec<ArrayRef> {
        let (mut auction, mut bidder, mut price) = (Int64Builder::new(), Int64Builder::new(), Int64Builder::new());
        let (mut channel, mut url, mut extra) = (StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
        let mut time = TimestampMillisecondBuilder::new();
        for n in events {
            let mut rng = Rng::new(n);
            let a = if rng.below(HOT_AUCTION_RATIO) > 0 {
                (last_auction(n) / HOT_GROUP) * HOT_GROUP
            } else {
                recent(last_auction(n), IN_FLIGHT_AUCTIONS, &mut rng)
            };
            let b = if rng.below(HOT_BIDDER_RATIO) > 0 {
                ((last_person(n) / HOT_GROUP) * HOT_GROUP + 1).min(last_person(n))
            } else {
                recent(last_person(n), ACTIVE_PEOPLE, &mut rng)
            };
            auction.append_value(a + FIRST_AUCTION_ID);
            bidder.append_value(b + FIRST_PERSON_ID);
            price.append_value(rng.price());
            let c = rng.below(CHANNELS.len() as u64) as usize;
            channel.append_value(CHANNELS[c]);
            url.append_value(URLS[c]);
            extra.append_value("");
            time.append_value(self.event_time_ms(n));
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(auction.finish()),
            Arc::new(bidder.finish()),
            Arc::new(price.finish()),
            Arc::new(channel.finish()),
            Arc::new(url.finish()),
            Arc::new(time.finish()),
            Arc::new(extra.finish()),
        ];
        cols
    }

    fn auctions(&self, events: impl Iterator<Item = u64>) -> Vec<ArrayRef> {
        let (mut id, mut initial, mut reserve) = (Int64Builder::new(), Int64Builder::new(), Int64Builder::new());
        let (mut seller, mut category) = (Int64Builder::new(), Int64Builder::new());
        let (mut item, mut description, mut extra) = (StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
        let (mut time, mut expires) = (TimestampMillisecondBuilder::new(), TimestampMillisecondBuilder::new());
        for n in events {
            let mut rng = Rng::new(n);
            let own = last_auction(n);
            id.append_value(own + FIRST_AUCTION_ID);
            let s = if rng.below(HOT_SELLER_RATIO) > 0 {
                (last_person(n) / HOT_GROUP) * HOT_GROUP
            } else {
                recent(last_person(n), ACTIVE_PEOPLE, &mut rng)
            };
            seller.append_value(s + FIRST_PERSON_ID);
            let first = rng.price();
            initial.append_value(first);
            reserve.append_value(first + rng.price());
            category.append_value(FIRST_CATEGORY_ID + rng.below(CATEGORIES) as i64);
            item.append_value(format!("item-{}", own + FIRST_AUCTION_ID));
            description.append_value("");
            extra.append_value("");
            let at = self.event_time_ms(n);
            time.append_value(at);
            // Auctions run for the event time of 1–20 s worth of in-flight auctions.
            expires.append_value(at + 1_000 + rng.below(19_000) as i64);
        }
        vec![
            Arc::new(id.finish()),
            Arc::new(item.finish()),
            Arc::new(description.finish()),
            Arc::new(initial.finish()),
            Arc::new(reserve.finish()),
            Arc::new(time.finish()),
            Arc::new(expires.finish()),
            Arc::new(seller.finish()),
            Arc::new(category.finish()),
            Arc::new(extra.finish()),
        ]
    }

    fn persons(&self, events: impl Iterator<Item = u64>) -> Vec<ArrayRef> {
        let mut id = Int64Builder::new();
        let (mut name, mut email, mut card) = (StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
        let (mut city, mut state, mut extra) = (StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
        let mut time = TimestampMillisecondBuilder::new();
        for n in events {
            let mut rng = Rng::new(n);
            let own = last_person(n) + FIRST_PERSON_ID;
            id.append_value(own);
            let first = FIRST_NAMES[rng.below(6) as usize];
            let last = LAST_NAMES[rng.below(6) as usize];
            name.append_value(format!("{first} {last}"));
            email.append_value(format!("{}@{}.com", first.to_ascii_lowercase(), own));
            card.append_value(format!("{:04} {:04} {:04} {:04}", rng.below(10_000), rng.below(10_000), rng.below(10_000), rng.below(10_000)));
            let place = rng.below(6) as usize;
            city.append_value(US_CITIES[place]);
            state.append_value(US_STATES[place]);
            extra.append_value("");
            time.append_value(self.event_time_ms(n));
        }
        vec![
            Arc::new(id.finish()),
            Arc::new(name.finish()),
            Arc::new(email.finish()),
            Arc::new(card.finish()),
            Arc::new(city.finish()),
            Arc::new(state.finish()),
            Arc::new(time.finish()),
            Arc::new(extra.finish()),
        ]
    }
}

fn kind_of(offset: u64) -> Table {
    if offset < PERSON_PROPORTION {
        Table::Person
    } else if offset < PERSON_PROPORTION + AUCTION_PROPORTION {
        Table::Auction
    } else {
        Table::Bid
    }
}

/// The 0-based id of the latest person created at or before event `n`.
fn last_person(n: u64) -> i64 {
    (n / PROPORTION * PERSON_PROPORTION) as i64
}

/// The 0-based id of the latest auction created at or before event `n` (for an auction
/// event, its own id).
fn last_auction(n: u64) -> i64 {
    let epoch = n / PROPORTION;
    let offset = (n % PROPORTION).clamp(PERSON_PROPORTION, PERSON_PROPORTION + AUCTION_PROPORTION - 1);
    let id = epoch * AUCTION_PROPORTION + (offset - PERSON_PROPORTION);
    // Before the first auction of the first block there is none yet: refer to auction 0.
    if n % PROPORTION < PERSON_PROPORTION && epoch > 0 {
        id as i64 - 1
    } else {
        id as i64
    }
}

/// One of the `window` ids up to `last`.
fn recent(last: i64, window: i64, rng: &mut Rng) -> i64 {
    let span = (last + 1).min(window).max(1) as u64;
    last - rng.below(span) as i64
}

/// splitmix64, seeded by the event number.
struct Rng(u64);

impl Rng {
    fn new(event: u64) -> Rng {
        Rng(event.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }

    /// Log-uniform from 1 to 10⁶ dollars, in cents (the standard generator's 10^(6u) × 100).
    fn price(&mut self) -> i64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (10f64.powf(u * 6.0) * 100.0).round() as i64
    }
}


impl SourceConnector for NexmarkConfig {
    fn name(&self) -> &'static str {
        "nexmark"
    }

    fn schema(&self) -> SchemaRef {
        self.table.schema()
    }

    fn ordered_time_column(&self) -> Option<&'static str> {
        Some("date_time")
    }

    fn splits(&self, shards: usize) -> Result<usize> {
        Ok(shards.max(1))
    }

    fn open(&self, split: usize, splits: usize, position: Option<&[u8]>) -> Result<Box<dyn SplitReader>> {
        let next = match position {
            Some(bytes) => read_offset_position(bytes, &format!("nexmark split {split}"))?,
            None => split as u64,
        };
        if splits == 0 || next % splits as u64 != split as u64 % splits as u64 {
            return Err(Error::checkpoint(format!("nexmark split {split} of {splits} cannot be at chunk {next}")));
        }
        Ok(Box::new(NexmarkSplit { config: self.clone(), next, step: splits as u64, progress: None }))
    }
}

/// Chunks `next, next + step, …` of a nexmark source.
struct NexmarkSplit {
    config: NexmarkConfig,
    next: u64,
    step: u64,
    /// The latest event time of the chunks produced (later chunks' events are not before it).
    progress: Option<i64>,
}

impl SplitReader for NexmarkSplit {
    fn poll(&mut self) -> Result<SplitPoll> {
        // A chunk may hold no row of this table: its time still passes.
        while self.next < self.config.chunks() {
            let chunk = self.next;
            let rows = self.config.chunk(chunk)?;
            self.next += self.step;
            self.progress = Some(self.config.chunk_end_time_ms(chunk));
            if let Some(rows) = rows {
                return Ok(SplitPoll::Rows(rows));
            }
        }
        Ok(SplitPoll::End)
    }

    fn position(&self) -> Vec<u8> {
        offset_position(self.next)
    }

    fn progress(&self) -> Option<i64> {
        self.progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;

    fn config(table: &str, events: u64) -> NexmarkConfig {
        let options = [("connector", "nexmark"), ("table", table), ("events", &events.to_string())]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        NexmarkConfig::from_options(&options).unwrap()
    }

    fn all_rows(c: &NexmarkConfig) -> Vec<RecordBatch> {
        (0..c.chunks()).filter_map(|k| c.chunk(k).unwrap()).collect()
    }

    #[test]
    fn proportions_are_one_three_forty_six() {
        for (table, expected) in [("person", 2_000), ("auction", 6_000), ("bid", 92_000)] {
            let c = config(table, 100_000);
            let rows: usize = all_rows(&c).iter().map(|b| b.num_rows()).sum();
            assert_eq!(rows, expected, "{table}");
            assert_eq!(c.rows_total(), expected as u64, "{table}");
        }
        // A partial block: events 0..53 hold persons 0 and 50, auctions 1..3 and 51..52.
        assert_eq!(config("person", 53).rows_total(), 2);
        assert_eq!(config("auction", 53).rows_total(), 5);
        assert_eq!(config("bid", 53).rows_total(), 46);
    }

    #[test]
    fn bids_refer_to_auctions_and_persons_that_exist() {
        let bids = all_rows(&config("bid", 50_000));
        let auctions = config("auction", 50_000).rows_total() as i64;
        let persons = config("person", 50_000).rows_total() as i64;
        for b in &bids {
            for a in b.column(0).as_primitive::<Int64Type>().values() {
                assert!((FIRST_AUCTION_ID..FIRST_AUCTION_ID + auctions).contains(a), "auction {a}");
            }
            for p in b.column(1).as_primitive::<Int64Type>().values() {
                assert!((FIRST_PERSON_ID..FIRST_PERSON_ID + persons).contains(p), "bidder {p}");
            }
            for price in b.column(2).as_primitive::<Int64Type>().values() {
                assert!((100..=100_000_000).contains(price), "price {price}");
            }
        }
    }

    #[test]
    fn event_time_ascends_and_rows_are_deterministic() {
        let c = config("bid", 30_000);
        let a = all_rows(&c);
        assert_eq!(a, all_rows(&c));
        let times: Vec<i64> = a
            .iter()
            .flat_map(|b| b.column(5).as_primitive::<arrow::datatypes::TimestampMillisecondType>().values().to_vec())
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        // 10,000 events per second of event time by default: event 29,999 is at +2,999 ms.
        assert_eq!(c.chunk_end_time_ms(2) - c.base_time_ms, 2_999);
        assert_eq!(a[0].column(5).len() + a[1].column(5).len() + a[2].column(5).len(), 27_600);
    }

    /// Reads split `split` of `splits` from `position` until it ends or `limit` batches came.
    fn read_split(c: &NexmarkConfig, split: usize, splits: usize, position: Option<&[u8]>, limit: usize) -> (Vec<RecordBatch>, Vec<u8>, bool) {
        let mut reader = c.open(split, splits, position).unwrap();
        let mut rows = Vec::new();
        while rows.len() < limit {
            match reader.poll().unwrap() {
                SplitPoll::Rows(batch) => rows.push(batch),
                SplitPoll::End => return (rows, reader.position(), true),
                SplitPoll::Pending(_) | SplitPoll::Skipped(_) => unreachable!("a generator never waits or skips"),
            }
        }
        (rows, reader.position(), false)
    }

    #[test]
    fn splits_cover_every_chunk_once_and_go_on_from_a_recorded_position() {
        let c = config("auction", 95_000);
        let want = c.rows_total() as usize;
        for splits in [1, 2, 3] {
            let mut total = 0;
            for split in 0..splits {
                // Two batches, then a reader opened where the first one stopped.
                let (first, position, ended) = read_split(&c, split, splits, None, 2);
                assert!(!ended);
                let (rest, _, ended) = read_split(&c, split, splits, Some(&position), usize::MAX);
                assert!(ended);
                let (whole, _, _) = read_split(&c, split, splits, None, usize::MAX);
                assert_eq!([first, rest].concat(), whole, "split {split} of {splits}");
                total += whole.iter().map(|b| b.num_rows()).sum::<usize>();
            }
            assert_eq!(total, want, "{splits} splits");
        }
        // Progress: the latest event time of what was read; a split's position belongs to it.
        let mut reader = c.open(1, 3, None).unwrap();
        assert_eq!(reader.progress(), None);
        reader.poll().unwrap();
        assert_eq!(reader.progress(), Some(c.chunk_end_time_ms(1)));
        let Err(e) = c.open(0, 3, Some(&offset_position(4))) else { panic!("opened at another split's chunk") };
        assert!(e.message.contains("cannot be at chunk 4"), "{}", e.message);
    }

    #[test]
    fn bad_options_are_connector_errors() {
        let bad = |pairs: &[(&str, &str)]| {
            let options = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            NexmarkConfig::from_options(&options).unwrap_err().to_string()
        };
        assert!(bad(&[("connector", "nexmark")]).contains("needs table"));
        assert!(bad(&[("table", "bids")]).contains("not one of person"));
        assert!(bad(&[("table", "bid"), ("events", "many")]).contains("not a positive integer"));
        assert!(bad(&[("table", "bid"), ("speed", "1")]).contains("option 'speed'"));
    }
}
