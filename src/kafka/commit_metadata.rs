//! The metadata string stored with a Kafka offset commit: which offsets above the committed one
//! are already finished.
//!
//! A Kafka commit only says "everything below this offset is done". When one record stays
//! unfinished for long (a FIFO queue head retrying) while thousands of later ones finish, a
//! restart would deliver all of those again. So, like Confluent's parallel-consumer, the finished
//! offsets above the committed position travel in the commit's metadata string, and the next owner
//! of the partition skips them.
//!
//! Format (ASCII only: rdkafka panics on metadata that is not UTF-8):
//!
//! ```text
//! ks1:<position>:<run>.<run>.<run>...
//! ```
//!
//! `<position>` is the offset the metadata was written for (the committed offset); when it differs
//! from the offset it is read back with, the offsets were reset externally and the metadata is
//! ignored. The runs are lengths of alternating unfinished and finished stretches of offsets
//! starting at the position, ending at the high mark (one past the highest offset seen). The first
//! run is unfinished: the position is the lowest unfinished offset. Numbers are lowercase base 36
//! without leading zeros; every run is at least one long. Example: position 0 unfinished, 1..=1000
//! finished, high mark 1001 is `ks1:0:1.rs`.
//!
//! Nothing finished above the position is the empty string (no skip information). When the
//! encoding would exceed the byte limit, trailing runs are dropped and the high mark is lowered to
//! the end of the last encoded run: the decoded result never claims an offset finished that was
//! not, records beyond it are merely processed again (duplicates are acceptable, losses are not).
//!
//! Decoding is strict and never panics: anything malformed, overflowing or non-canonical decodes
//! to `None`, which the caller treats as "no skip information".

/// Marks the format (and its version) of metadata written by kstash.
const PREFIX: &str = "ks1:";
/// Separates the position from the runs.
const POSITION_END: char = ':';
/// Separates runs.
const RUN_SEPARATOR: char = '.';
/// Base of the numbers: digits and lowercase letters.
const RADIX: u32 = 36;
/// Digits of a number in [`RADIX`], most significant first.
const DIGITS: &[u8; RADIX as usize] = b"0123456789abcdefghijklmnopqrstuvwxyz";
/// Most digits an `i64` needs in [`RADIX`]; longer numbers are refused before parsing.
const MAX_DIGITS: usize = 13;

/// What a metadata string says about a partition above its committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Finished offsets as maximal half-open ranges `(start, end)`, ascending, all above the
    /// committed offset.
    pub done: Vec<(i64, i64)>,
    /// One past the highest offset the writer had seen (at least the end of the last range).
    pub next: i64,
}

/// Encodes the finished ranges above `position` (the lowest unfinished offset) and the high mark
/// `next`, in at most `max_bytes` bytes.
///
/// `done` should be ascending, disjoint and above `position`, as the tracker keeps it; anything
/// else is tolerated conservatively (overlapping or adjacent ranges are merged, parts at or below
/// `position` are left out), never by claiming more than was given. Returns `""` when nothing
/// finished above `position` fits.
pub fn encode(
    position: i64,
    done: impl IntoIterator<Item = (i64, i64)>,
    next: i64,
    max_bytes: usize,
) -> String {
    let mut out = String::from(PREFIX);
    push_number(&mut out, position);
    out.push(POSITION_END);
    let header = out.len();
    // End of what is encoded so far; the next run starts here.
    let mut cursor = position;
    let mut pending: Option<(i64, i64)> = None;
    let mut complete = true;
    for (start, end) in done {
        // The first run must be unfinished: never claim the position itself.
        let start = start.max(position.saturating_add(1));
        if end <= start {
            continue;
        }
        match &mut pending {
            Some((_, pending_end)) if start <= *pending_end => *pending_end = end.max(*pending_end),
            _ => {
                if let Some(range) = pending.replace((start, end)) {
                    if !push_pair(&mut out, &mut cursor, range, max_bytes) {
                        complete = false;
                        break;
                    }
                }
            }
        }
    }
    if complete {
        if let Some(range) = pending {
            complete = push_pair(&mut out, &mut cursor, range, max_bytes);
        }
    }
    if out.len() == header {
        return String::new();
    }
    if complete && next > cursor {
        let mark = out.len();
        out.push(RUN_SEPARATOR);
        push_number(&mut out, next - cursor);
        if out.len() > max_bytes {
            out.truncate(mark);
        }
    }
    out
}

/// Appends the unfinished run up to `range` and the finished run of `range` if both fit in
/// `max_bytes`; returns false (leaving `out` as it was) when they do not.
fn push_pair(out: &mut String, cursor: &mut i64, range: (i64, i64), max_bytes: usize) -> bool {
    let mark = out.len();
    if !out.ends_with(POSITION_END) {
        out.push(RUN_SEPARATOR);
    }
    push_number(out, range.0 - *cursor);
    out.push(RUN_SEPARATOR);
    push_number(out, range.1 - range.0);
    if out.len() > max_bytes {
        out.truncate(mark);
        return false;
    }
    *cursor = range.1;
    true
}

/// Appends `n` (not negative) in [`RADIX`].
fn push_number(out: &mut String, n: i64) {
    let mut n = u64::try_from(n).unwrap_or_default();
    let mut digits = [0u8; MAX_DIGITS];
    let mut len = 0;
    loop {
        digits[MAX_DIGITS - 1 - len] = DIGITS[usize::try_from(n % u64::from(RADIX)).unwrap_or(0)];
        len += 1;
        n /= u64::from(RADIX);
        if n == 0 {
            break;
        }
    }
    for &d in &digits[MAX_DIGITS - len..] {
        out.push(char::from(d));
    }
}

/// Parses a canonical number in [`RADIX`]: lowercase digits, no sign, no leading zeros.
fn parse_number(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > MAX_DIGITS || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.bytes().try_fold(0i64, |n, b| {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'z' => b - b'a' + 10,
            _ => return None,
        };
        n.checked_mul(i64::from(RADIX))?
            .checked_add(i64::from(digit))
    })
}

/// Decodes metadata read back with `committed_offset`. `None` means no skip information: empty,
/// not written by kstash, malformed, or written for another offset.
pub fn decode(committed_offset: i64, metadata: &str) -> Option<Decoded> {
    let (position, runs) = metadata.strip_prefix(PREFIX)?.split_once(POSITION_END)?;
    if committed_offset < 0 || parse_number(position)? != committed_offset {
        return None;
    }
    let mut done = Vec::new();
    let mut cursor = committed_offset;
    for (i, run) in runs.split(RUN_SEPARATOR).enumerate() {
        let len = parse_number(run)?;
        if len == 0 {
            return None;
        }
        let end = cursor.checked_add(len)?;
        let finished = i % 2 == 1;
        if finished {
            done.push((cursor, end));
        }
        cursor = end;
    }
    if done.is_empty() {
        return None;
    }
    Some(Decoded { done, next: cursor })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Kafka's default `offset.metadata.max.bytes` is 4096; kstash stays below it.
    const LIMIT: usize = 4000;

    #[test]
    fn example_format() {
        let m = encode(0, [(1, 1001)], 1001, LIMIT);
        assert_eq!(m, "ks1:0:1.rs");
        assert_eq!(
            decode(0, &m),
            Some(Decoded {
                done: vec![(1, 1001)],
                next: 1001
            })
        );
        let m = encode(46_656, [(46_658, 46_660), (46_700, 46_701)], 46_800, LIMIT);
        assert_eq!(m, "ks1:1000:2.2.14.1.2r");
        assert_eq!(
            decode(46_656, &m).unwrap().done,
            vec![(46_658, 46_660), (46_700, 46_701)]
        );
        assert_eq!(decode(46_656, &m).unwrap().next, 46_800);
    }

    #[test]
    fn nothing_finished_above_the_position_is_empty() {
        assert_eq!(encode(5, [], 100, LIMIT), "");
        assert_eq!(decode(5, ""), None);
    }

    #[test]
    fn metadata_for_another_offset_is_ignored() {
        let m = encode(10, [(12, 20)], 20, LIMIT);
        assert!(decode(10, &m).is_some());
        assert_eq!(decode(11, &m), None, "offsets were reset externally");
        assert_eq!(decode(-1, "ks1:0:1.1"), None);
    }

    #[test]
    fn malformed_metadata_is_refused() {
        for bad in [
            "garbage",
            "ks1:",
            "ks1:0",
            "ks1:0:",
            "ks1:0:1",
            "ks1:0:0.1",
            "ks1:0:1.0",
            "ks1:0:1..1",
            "ks1:0:1.1.",
            "ks1:0:01.1",
            "ks1:00:1.1",
            "ks1:0:A.1",
            "ks1:0:-1.1",
            "ks1:0:+1.1",
            "ks1:0:1.zzzzzzzzzzzzz",
            "ks1:0:1.zzzzzzzzzzzzzz",
            "ks1:0:1.1:1",
            "ks2:0:1.1",
            "ks1:0:1.1.é",
        ] {
            assert_eq!(decode(0, bad), None, "{bad}");
        }
        assert_eq!(
            decode(i64::MAX - 1, &format!("ks1:{}:1.1", "1y2p0ij32e8e6")),
            None,
            "runs overflowing i64"
        );
    }

    #[test]
    fn over_the_limit_trailing_runs_are_dropped() {
        let done: Vec<_> = (0..100).map(|i| (2 * i + 1, 2 * i + 2)).collect();
        let full = encode(0, done.clone(), 300, LIMIT);
        assert_eq!(decode(0, &full).unwrap().done, done);
        let cut = encode(0, done.clone(), 300, 20);
        assert!(cut.len() <= 20, "{cut}");
        let decoded = decode(0, &cut).unwrap();
        assert_eq!(decoded.done, done[..decoded.done.len()]);
        assert_eq!(decoded.next, decoded.done.last().unwrap().1);
        assert_eq!(
            encode(0, done, 300, PREFIX.len() + 4),
            "",
            "not even one pair fits"
        );
    }

    #[test]
    fn ranges_not_above_the_position_are_not_claimed() {
        let m = encode(10, [(5, 12), (12, 14), (20, 21)], 25, LIMIT);
        let d = decode(10, &m).unwrap();
        assert_eq!(d.done, vec![(11, 14), (20, 21)]);
        assert_eq!(d.next, 25);
    }

    /// Finished sets as random run lengths above a random position.
    fn layout() -> impl Strategy<Value = (i64, Vec<(i64, i64)>, i64)> {
        (
            0..i64::MAX / 2,
            proptest::collection::vec((1..2_000i64, 1..2_000i64), 0..300),
            0..5i64,
        )
            .prop_map(|(position, runs, tail)| {
                let mut cursor = position;
                let done = runs
                    .into_iter()
                    .map(|(gap, len)| {
                        let start = cursor + gap;
                        cursor = start + len;
                        (start, cursor)
                    })
                    .collect();
                (position, done, cursor + tail)
            })
    }

    proptest! {
        #[test]
        fn round_trip((position, done, next) in layout()) {
            let m = encode(position, done.clone(), next, usize::MAX);
            prop_assert!(m.is_ascii());
            if done.is_empty() {
                prop_assert_eq!(m, "");
            } else {
                prop_assert_eq!(decode(position, &m), Some(Decoded { done, next }));
            }
        }

        #[test]
        fn over_the_limit_never_claims_more((position, done, next) in layout(), max_bytes in 0..200usize) {
            let m = encode(position, done.clone(), next, max_bytes);
            prop_assert!(m.len() <= max_bytes);
            if let Some(d) = decode(position, &m) {
                prop_assert!(d.next <= next);
                prop_assert_eq!(&d.done[..], &done[..d.done.len()]);
            }
        }

        #[test]
        fn decode_never_panics(s in "\\PC*", committed in any::<i64>()) {
            let _ = decode(committed, &s);
        }

        #[test]
        fn decode_never_panics_on_near_misses(
            position in "[0-9a-z]{1,14}",
            runs in proptest::collection::vec("[0-9a-z]{0,14}", 0..6),
            committed in any::<i64>(),
        ) {
            let m = format!("{PREFIX}{position}:{}", runs.join("."));
            let committed = parse_number(&position).unwrap_or(committed);
            if let Some(d) = decode(committed, &m) {
                prop_assert!(d.done.windows(2).all(|w| w[0].1 < w[1].0));
                prop_assert!(d.done.iter().all(|r| committed < r.0 && r.0 < r.1 && r.1 <= d.next));
            }
        }
    }
}
