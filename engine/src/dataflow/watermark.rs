//! Event-time progress: the [`Watermark`] newtype and the [`WatermarkHolder`] that merges
//! the watermarks of an operator's inputs (per input, and per sending shard behind an
//! exchange), leaving idle inputs out.

/// "No row with an event time below this will come": milliseconds since the epoch (the
/// unit of every event-time column once read). An input that has sent none has no
/// watermark (`Option<Watermark>` is `None`), which holds back every merge it is part of.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Watermark(i64);

impl Watermark {
    pub const fn new(ms: i64) -> Watermark {
        Watermark(ms)
    }

    pub const fn ms(self) -> i64 {
        self.0
    }

    /// What [`encode`](Self::encode) makes of no watermark: below every other, so
    /// `fetch_max` on an atomic holding encoded watermarks moves it on from "none".
    pub const ENCODED_NONE: i64 = i64::MIN;

    /// The encoding of checkpoints, the exchange and the metrics' atomics.
    pub const fn encode(mark: Option<Watermark>) -> i64 {
        match mark {
            Some(w) => w.0,
            None => Self::ENCODED_NONE,
        }
    }

    pub fn decode(raw: i64) -> Option<Watermark> {
        (raw != Self::ENCODED_NONE).then_some(Watermark(raw))
    }
}

impl std::fmt::Display for Watermark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ms", self.0)
    }
}

/// The watermarks of one operator's input slots and their merge: the minimum over the
/// slots that are not idle. A slot is one input (port) fed locally, or one input × one
/// sending shard behind an exchange. The merged watermark only moves forward.
#[derive(Clone, Debug)]
pub struct WatermarkHolder {
    slots: Vec<Option<Watermark>>,
    idle: Vec<bool>,
    merged: Option<Watermark>,
}

impl WatermarkHolder {
    pub fn new(slots: usize) -> WatermarkHolder {
        WatermarkHolder { slots: vec![None; slots], idle: vec![false; slots], merged: None }
    }

    pub fn merged(&self) -> Option<Watermark> {
        self.merged
    }

    pub fn slot(&self, slot: usize) -> Option<Watermark> {
        self.slots[slot]
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Slot `slot` reached `mark` (a lower one than it had is ignored). Returns the merged
    /// watermark if it moved.
    pub fn update(&mut self, slot: usize, mark: Watermark) -> Option<Watermark> {
        let current = &mut self.slots[slot];
        if current.is_some_and(|c| c >= mark) {
            return None;
        }
        *current = Some(mark);
        self.remerge()
    }

    /// Slot `slot` stops (or starts again) holding back the merge. While every slot is
    /// idle the merged watermark holds.
    pub fn set_idle(&mut self, slot: usize, idle: bool) -> Option<Watermark> {
        if self.idle[slot] == idle {
            return None;
        }
        self.idle[slot] = idle;
        self.remerge()
    }

    /// Restores the slots a checkpoint recorded (`Watermark::encode`d), and the merge.
    pub fn restore(&mut self, raw: &[i64], merged: i64) {
        if raw.len() == self.slots.len() {
            self.slots = raw.iter().map(|&r| Watermark::decode(r)).collect();
        }
        self.merged = Watermark::decode(merged);
    }

    /// The slots as a checkpoint records them.
    pub fn encoded(&self) -> Vec<i64> {
        self.slots.iter().map(|&s| Watermark::encode(s)).collect()
    }

    fn remerge(&mut self) -> Option<Watermark> {
        let mut active = self.slots.iter().zip(&self.idle).filter(|(_, idle)| !**idle).map(|(s, _)| *s).peekable();
        // Every slot idle: the watermark holds.
        active.peek()?;
        let min = active.min().flatten()?;
        if self.merged.is_some_and(|m| m >= min) {
            return None;
        }
        self.merged = Some(min);
        Some(min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(ms: i64) -> Watermark {
        Watermark::new(ms)
    }

    #[test]
    fn the_merge_waits_for_every_slot_and_is_their_minimum() {
        let mut h = WatermarkHolder::new(3);
        assert_eq!(h.update(0, w(10)), None);
        assert_eq!(h.update(1, w(5)), None);
        assert_eq!(h.update(2, w(7)), Some(w(5)));
        assert_eq!(h.update(1, w(20)), Some(w(7)));
        assert_eq!(h.merged(), Some(w(7)));
    }

    #[test]
    fn a_slot_never_goes_back_and_neither_does_the_merge() {
        let mut h = WatermarkHolder::new(2);
        h.update(0, w(10));
        h.update(1, w(10));
        assert_eq!(h.update(0, w(3)), None);
        assert_eq!(h.slot(0), Some(w(10)));
        // An idle slot leaving lets the merge jump; coming back lower does not pull it back.
        let mut h = WatermarkHolder::new(2);
        h.update(0, w(50));
        assert_eq!(h.set_idle(1, true), Some(w(50)));
        h.update(1, w(5));
        assert_eq!(h.set_idle(1, false), None);
        assert_eq!(h.merged(), Some(w(50)));
    }

    #[test]
    fn idle_slots_are_left_out_and_all_idle_holds() {
        let mut h = WatermarkHolder::new(2);
        h.update(0, w(100));
        assert_eq!(h.merged(), None, "slot 1 has none yet");
        assert_eq!(h.set_idle(1, true), Some(w(100)));
        assert_eq!(h.set_idle(0, true), None, "every slot idle: holds");
        assert_eq!(h.merged(), Some(w(100)));
        assert_eq!(h.set_idle(1, false), None, "slot 1 still has none");
    }

    #[test]
    fn checkpoint_encoding_round_trips_none() {
        let mut h = WatermarkHolder::new(2);
        h.update(1, w(-5));
        let raw = h.encoded();
        assert_eq!(raw, vec![i64::MIN, -5]);
        let mut back = WatermarkHolder::new(2);
        back.restore(&raw, Watermark::encode(h.merged()));
        assert_eq!(back.slot(0), None);
        assert_eq!(back.slot(1), Some(w(-5)));
        assert_eq!(back.update(0, w(1)), Some(w(-5)));
    }
}
