//! Checkpoint barrier alignment of one shard's exchange inbox (Chandy–Lamport).
//!
//! A checkpoint's barrier reaches each shard on its command stream; the shard snapshots
//! its state there and sends a marker to every peer over the exchange. What a peer sent
//! before its marker but arrives after this shard's snapshot belongs to the cut while
//! being in nobody's state: it is recorded with the checkpoint (and still applied). A
//! marker that comes before this shard's own barrier means the peer is ahead: what it
//! sends next is past the cut, so it is held, unapplied, until this shard has snapshotted.

/// The alignment state of one shard for messages of type `T` from its peers.
#[derive(Debug)]
pub struct Alignment<T> {
    me: usize,
    /// Per peer, while a checkpoint is pending here: its marker has not arrived yet.
    awaiting: Option<Vec<bool>>,
    /// Per peer: `Some` once its marker of the next checkpoint came before this shard's
    /// barrier; holds what that peer sent after it.
    early: Vec<Option<Vec<T>>>,
}

impl<T> Alignment<T> {
    pub fn new(me: usize, shards: usize) -> Alignment<T> {
        Alignment { me, awaiting: None, early: (0..shards).map(|_| None).collect() }
    }

    /// This shard reached the barrier and snapshotted. Returns the messages held from
    /// peers that were ahead (to apply now: they are past both snapshots). A checkpoint
    /// still pending is overtaken (the caller fails it).
    pub fn begin(&mut self) -> Vec<T> {
        let awaiting = (0..self.early.len()).map(|s| s != self.me && self.early[s].is_none()).collect();
        self.awaiting = Some(awaiting);
        self.early.iter_mut().filter_map(Option::take).flatten().collect()
    }

    /// Whether a message from `from` would be held.
    pub fn holds(&self, from: usize) -> bool {
        self.early[from].is_some()
    }

    /// Whether a message from `from` is in flight across the pending checkpoint's cut.
    pub fn records(&self, from: usize) -> bool {
        self.awaiting.as_ref().is_some_and(|a| a[from])
    }

    /// Holds `msg` from `from` until this shard's barrier (only when `holds(from)`).
    pub fn hold(&mut self, from: usize, msg: T) {
        if let Some(held) = self.early[from].as_mut() {
            held.push(msg);
        }
    }

    /// `from`'s marker arrived. Returns true when it completes the pending checkpoint's
    /// alignment (every peer's marker is in).
    pub fn marker(&mut self, from: usize) -> bool {
        match self.awaiting.as_mut() {
            Some(awaiting) if awaiting[from] => {
                awaiting[from] = false;
                self.aligned()
            }
            // Before this shard's own barrier: hold what `from` sends next.
            _ => {
                self.early[from] = Some(Vec::new());
                false
            }
        }
    }

    /// Every peer's marker of the pending checkpoint is in.
    pub fn aligned(&self) -> bool {
        self.awaiting.as_ref().is_some_and(|a| !a.contains(&true))
    }

    /// The pending checkpoint is done (or abandoned).
    pub fn finish(&mut self) {
        self.awaiting = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shard 1's marker reaches shard 0 before shard 0's barrier: what shard 1 sends next
    /// is held until shard 0 snapshots, then applied without being recorded.
    #[test]
    fn a_marker_before_the_barrier_holds_what_follows_it() {
        let mut a: Alignment<&str> = Alignment::new(0, 3);
        assert!(!a.marker(1));
        assert!(a.holds(1) && !a.holds(2));
        a.hold(1, "after 1's marker");
        assert_eq!(a.begin(), vec!["after 1's marker"]);
        assert!(!a.records(1), "1 is past the cut already");
        assert!(a.records(2), "2's messages are in flight until its marker");
        assert!(a.marker(2), "aligned");
        a.finish();
        assert!(!a.records(2) && !a.aligned(), "nothing pending");
    }

    #[test]
    fn the_usual_order_records_until_each_marker() {
        let mut a: Alignment<()> = Alignment::new(1, 2);
        assert!(a.begin().is_empty());
        assert!(a.records(0) && !a.aligned());
        assert!(a.marker(0));
        assert!(!a.records(0));
    }

    #[test]
    fn one_shard_is_aligned_at_once() {
        let mut a: Alignment<()> = Alignment::new(0, 1);
        a.begin();
        assert!(a.aligned());
    }
}
