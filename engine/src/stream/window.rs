//! Window assignment over epoch-millisecond event times. Windows are half-open
//! `[start, end)`.

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum WindowKind {
    Tumble { size: i64 },
    /// Overlapping windows of `size`, one starting every `slide`.
    Hop { slide: i64, size: i64 },
    /// Windows of `size` growing by `step`: `[s, s+step)`, `[s, s+2·step)`, … `[s, s+size)`.
    Cumulate { step: i64, size: i64 },
    /// Rows closer than `gap` to each other form one window; it ends `gap` after its last row.
    Session { gap: i64 },
}

impl WindowKind {
    /// Most windows one row may belong to (HOP: size / slide, CUMULATE: size / step): each
    /// is a group to update, so a tiny slide under a long size would make one row cost
    /// gigabytes.
    pub const MAX_WINDOWS_PER_ROW: i64 = 10_000;

    pub fn validate(self) -> Result<Self, String> {
        let positive = |v: i64, what: &str| if v > 0 { Ok(()) } else { Err(format!("window {what} must be positive")) };
        match self {
            WindowKind::Tumble { size } => positive(size, "size")?,
            WindowKind::Hop { slide, size } => {
                positive(slide, "slide")?;
                positive(size, "size")?;
                per_row("HOP", "slide", slide, size)?;
            }
            WindowKind::Cumulate { step, size } => {
                positive(step, "step")?;
                positive(size, "size")?;
                if size % step != 0 {
                    return Err("CUMULATE size must be a multiple of its step".into());
                }
                per_row("CUMULATE", "step", step, size)?;
            }
            WindowKind::Session { gap } => positive(gap, "gap")?,
        }
        Ok(self)
    }

    /// Appends every `(start, end)` window `ts` belongs to (not for sessions).
    pub fn assign(self, ts: i64, out: &mut Vec<(i64, i64)>) {
        match self {
            WindowKind::Tumble { size } => {
                let start = ts.div_euclid(size) * size;
                out.push((start, start + size));
            }
            WindowKind::Hop { slide, size } => {
                // The earliest window holding ts starts after ts - size, on a slide boundary.
                let last = ts.div_euclid(slide) * slide;
                let mut start = last - (size - 1).div_euclid(slide) * slide;
                while start <= last {
                    if start > ts - size {
                        out.push((start, start + size));
                    }
                    start += slide;
                }
            }
            WindowKind::Cumulate { step, size } => {
                let base = ts.div_euclid(size) * size;
                let mut end = base + step;
                while end <= base + size {
                    if end > ts {
                        out.push((base, end));
                    }
                    end += step;
                }
            }
            WindowKind::Session { gap } => out.push((ts, ts + gap)),
        }
    }
}

fn per_row(window: &str, what: &str, every: i64, size: i64) -> Result<(), String> {
    let windows = (size + every - 1) / every;
    if windows > WindowKind::MAX_WINDOWS_PER_ROW {
        return Err(format!(
            "{window} with a {what} of {every} ms and a size of {size} ms puts every row into {windows} windows; \
             at most {} are supported (use a larger {what} or a smaller size)",
            WindowKind::MAX_WINDOWS_PER_ROW
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows(kind: WindowKind, ts: i64) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        kind.assign(ts, &mut out);
        out
    }

    #[test]
    fn tumble_floors_including_negative_times() {
        assert_eq!(windows(WindowKind::Tumble { size: 1000 }, 1999), vec![(1000, 2000)]);
        assert_eq!(windows(WindowKind::Tumble { size: 1000 }, -1), vec![(-1000, 0)]);
    }

    #[test]
    fn hop_puts_a_row_in_size_over_slide_windows() {
        assert_eq!(
            windows(WindowKind::Hop { slide: 500, size: 1500 }, 1200),
            vec![(0, 1500), (500, 2000), (1000, 2500)]
        );
    }

    #[test]
    fn hop_with_a_size_that_is_not_a_multiple_of_the_slide() {
        assert_eq!(windows(WindowKind::Hop { slide: 400, size: 1000 }, 1200), vec![(400, 1400), (800, 1800), (1200, 2200)]);
        assert_eq!(windows(WindowKind::Hop { slide: 400, size: 1000 }, 1199), vec![(400, 1400), (800, 1800)]);
        assert_eq!(windows(WindowKind::Hop { slide: 1000, size: 1000 }, -1), vec![(-1000, 0)]);
    }

    #[test]
    fn cumulate_grows_until_size() {
        assert_eq!(
            windows(WindowKind::Cumulate { step: 1000, size: 3000 }, 1500),
            vec![(0, 2000), (0, 3000)]
        );
        assert!(WindowKind::Cumulate { step: 1000, size: 2500 }.validate().is_err());
    }

    #[test]
    fn a_row_may_belong_to_at_most_ten_thousand_windows() {
        let day = 86_400_000;
        let err = WindowKind::Hop { slide: 1, size: 10 * day }.validate().unwrap_err();
        assert!(err.contains("864000000 windows"), "{err}");
        assert!(WindowKind::Cumulate { step: 1, size: day }.validate().is_err());
        WindowKind::Hop { slide: 1, size: 10_000 }.validate().unwrap();
        assert!(WindowKind::Hop { slide: 1, size: 10_001 }.validate().is_err());
    }
}
