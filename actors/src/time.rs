//! Timestamps and local-time bucket keys (docs/SPEC.md sections 1 and 5).
//!
//! A bucket key is the bucket's local start plus the UTC offset in force at that start, packed into
//! a `u64` so that node state stays small and keys of one granularity sort in local-time order.
//! Across a DST fall-back the repeated hour has two keys (`01:00-04:00` and `01:00-05:00`); in a gap
//! the offset *before* the transition is used for the first occurrence, exactly as Python's
//! `zoneinfo` resolves `fold=0` (the reference oracle's rule).

use jiff::civil::DateTime;
use jiff::tz::{AmbiguousOffset, Offset, TimeZone};
use jiff::Timestamp;

use crate::agg::Granularity;

/// Microseconds since the Unix epoch.
pub type Micros = i64;

/// 2200-01-01T00:00:00Z in seconds: the exclusive upper bound of a valid `ts`.
pub const TS_MAX_SECS: i64 = 7_258_118_400;
const OFFSET_BIAS: i64 = 1 << 19;

/// A packed bucket key: `(local start in minutes since the civil epoch) << 20 | offset + 2^19`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BucketKey(pub u64);

impl BucketKey {
    pub fn new(local_secs: i64, offset_secs: i32) -> Self {
        debug_assert!(local_secs.rem_euclid(60) == 0);
        let mins = local_secs.div_euclid(60);
        BucketKey(((mins as u64) << 20) | (offset_secs as i64 + OFFSET_BIAS) as u64)
    }

    pub fn local_secs(self) -> i64 {
        ((self.0 >> 20) as i64) * 60
    }

    pub fn offset_secs(self) -> i32 {
        ((self.0 & ((1 << 20) - 1)) as i64 - OFFSET_BIAS) as i32
    }

    /// The instant the bucket starts, in seconds since the epoch.
    pub fn instant_secs(self) -> i64 {
        self.local_secs() - self.offset_secs() as i64
    }

    /// RFC 3339 with the offset in force, `Z` for UTC, like the oracle's `fmt`.
    pub fn format(self) -> String {
        let dt = TimeZone::UTC
            .to_datetime(Timestamp::from_second(self.local_secs()).expect("bucket key in range"));
        let mut s = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            dt.year(),
            dt.month(),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        );
        let off = self.offset_secs();
        if off == 0 {
            s.push('Z');
        } else {
            let sign = if off >= 0 { '+' } else { '-' };
            let a = off.unsigned_abs();
            s.push_str(&format!("{sign}{:02}:{:02}", a / 3600, (a % 3600) / 60));
        }
        s
    }

    /// Parses a key formatted by [`BucketKey::format`] (or any RFC 3339 bucket start with seconds).
    pub fn parse(s: &str) -> Option<BucketKey> {
        let ts = parse_rfc3339(s)?;
        let off = parse_offset(&s[19..])?;
        let local = ts.div_euclid(1_000_000) + off as i64;
        if local.rem_euclid(60) != 0 {
            return None;
        }
        Some(BucketKey::new(local, off))
    }
}

fn parse_offset(s: &str) -> Option<i32> {
    let s = match s.find(['Z', '+', '-']) {
        Some(i) => &s[i..],
        None => return None,
    };
    if s == "Z" {
        return Some(0);
    }
    let b = s.as_bytes();
    if b.len() != 6 || b[3] != b':' {
        return None;
    }
    let h = two(&b[1..3])?;
    let m = two(&b[4..6])?;
    let v = (h * 3600 + m * 60) as i32;
    Some(if b[0] == b'-' { -v } else { v })
}

fn two(b: &[u8]) -> Option<u32> {
    if b.len() == 2 && b[0].is_ascii_digit() && b[1].is_ascii_digit() {
        Some(((b[0] - b'0') * 10 + (b[1] - b'0')) as u32)
    } else {
        None
    }
}

fn digits(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u32;
    }
    Some(v)
}

fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days from 1970-01-01 to the civil date (proleptic Gregorian), after H. Hinnant.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|±HH:MM)` into microseconds since the epoch
/// (fractions beyond microseconds are truncated, as the oracle does). No range check.
pub fn parse_rfc3339(s: &str) -> Option<Micros> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = two(&b[5..7])?;
    let day = two(&b[8..10])?;
    let hour = two(&b[11..13])?;
    let minute = two(&b[14..16])?;
    let second = two(&b[17..19])?;
    let mut i = 19;
    let mut micros = 0u32;
    if b[i] == b'.' {
        let start = i + 1;
        let mut end = start;
        while end < b.len() && b[end].is_ascii_digit() {
            end += 1;
        }
        let n = end - start;
        if n == 0 || n > 9 {
            return None;
        }
        let kept = &b[start..start + n.min(6)];
        micros = digits(kept)? * 10u32.pow(6 - kept.len() as u32);
        i = end;
    }
    let off = parse_offset_exact(&b[i..])?;
    if year < 1 || !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = days_from_civil(year as i64, month, day);
    let local = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64;
    Some((local - off as i64) * 1_000_000 + micros as i64)
}

fn parse_offset_exact(b: &[u8]) -> Option<i32> {
    if b == b"Z" {
        return Some(0);
    }
    if b.len() != 6 || (b[0] != b'+' && b[0] != b'-') || b[3] != b':' {
        return None;
    }
    let h = two(&b[1..3])?;
    let m = two(&b[4..6])?;
    if h > 23 || m > 59 {
        return None;
    }
    let v = (h * 3600 + m * 60) as i32;
    Some(if b[0] == b'-' { -v } else { v })
}

/// Validates the range of docs/SPEC.md section 1: 1970-01-01T00:00:00Z ≤ ts < 2200-01-01T00:00:00Z.
pub fn in_range(ts: Micros) -> bool {
    (0..TS_MAX_SECS * 1_000_000).contains(&ts)
}

/// Resolves a local wall-clock start to its offset with Python's `fold` rule.
fn resolve(tz: &TimeZone, local: DateTime, fold: bool) -> Offset {
    match tz.to_ambiguous_timestamp(local).offset() {
        AmbiguousOffset::Unambiguous { offset } => offset,
        AmbiguousOffset::Gap { before, after } | AmbiguousOffset::Fold { before, after } => {
            if fold {
                after
            } else {
                before
            }
        }
    }
}

/// Computes the minute, hour and day bucket keys of an instant in a time zone.
pub fn bucket_keys(tz: &TimeZone, ts: Micros) -> [BucketKey; 3] {
    let t = Timestamp::from_microsecond(ts).expect("validated timestamp");
    let offset = tz.to_offset(t);
    let local = TimeZone::fixed(offset).to_datetime(t);
    let fold = matches!(
        tz.to_ambiguous_timestamp(local).offset(),
        AmbiguousOffset::Fold { after, .. } if after == offset
    );
    let minute = local
        .with()
        .second(0)
        .subsec_nanosecond(0)
        .build()
        .expect("valid");
    let hour = minute.with().minute(0).build().expect("valid");
    let day = hour.with().hour(0).build().expect("valid");
    let key = |dt: DateTime, fold: bool| {
        let off = resolve(tz, dt, fold);
        let local_secs = TimeZone::UTC
            .to_timestamp(dt)
            .expect("in range")
            .as_second();
        BucketKey::new(local_secs, off.seconds())
    };
    [key(minute, fold), key(hour, fold), key(day, false)]
}

/// Per-tenant memo of bucket keys by UTC minute: consecutive events mostly share a minute, and
/// resolving a zone costs far more than a lookup. Only used when the offset is a whole minute
/// (otherwise the local minute depends on the seconds within the UTC minute).
#[derive(Clone)]
pub struct BucketCache {
    tz: TimeZone,
    slots: Vec<Option<(i64, [BucketKey; 3])>>,
}

impl BucketCache {
    const SLOTS: usize = 256;

    pub fn new(tz: TimeZone) -> Self {
        BucketCache {
            tz,
            slots: vec![None; Self::SLOTS],
        }
    }

    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }

    pub fn keys(&mut self, ts: Micros) -> [BucketKey; 3] {
        let minute = ts.div_euclid(60_000_000);
        let slot = (minute as usize) % Self::SLOTS;
        if let Some((m, keys)) = self.slots[slot] {
            if m == minute {
                return keys;
            }
        }
        let keys = bucket_keys(&self.tz, ts);
        if keys[0].offset_secs() % 60 == 0 {
            self.slots[slot] = Some((minute, keys));
        }
        keys
    }
}

/// Retention windows per granularity in microseconds (docs/SPEC.md section 6 defaults: 48 h, 35 days, 400 days).
/// Serialized with the names of the configuration's `tenant` section, where it is flattened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Retention {
    #[serde(rename = "retention_minute_secs")]
    pub minute_secs: i64,
    #[serde(rename = "retention_hour_secs")]
    pub hour_secs: i64,
    #[serde(rename = "retention_day_secs")]
    pub day_secs: i64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            minute_secs: 48 * 3600,
            hour_secs: 35 * 86_400,
            day_secs: 400 * 86_400,
        }
    }
}

impl Retention {
    pub fn secs(&self, g: Granularity) -> i64 {
        match g {
            Granularity::Minute => self.minute_secs,
            Granularity::Hour => self.hour_secs,
            Granularity::Day => self.day_secs,
        }
    }

    /// Local-time cutoffs below which buckets may be dropped. Two days of slack keep every
    /// bucket that could still be inside retention whatever its offset.
    pub fn prune_cutoffs(&self, watermark: Micros) -> [u64; 3] {
        let wm = watermark.div_euclid(1_000_000);
        Granularity::ALL.map(|g| {
            let cut = wm - self.secs(g) - 2 * 86_400;
            if cut <= 0 {
                0
            } else {
                BucketKey::new(cut - cut.rem_euclid(60), -(OFFSET_BIAS as i32)).0
            }
        })
    }
}

/// Looks a zone up by its exact IANA name (Python's `ZoneInfo` is case-sensitive; jiff is not).
pub fn zone(name: &str) -> Option<TimeZone> {
    use std::collections::HashSet;
    use std::sync::OnceLock;
    static NAMES: OnceLock<HashSet<String>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        let mut s: HashSet<String> = jiff::tz::db().available().map(|n| n.to_string()).collect();
        s.insert("UTC".into());
        s
    });
    if !names.contains(name) {
        return None;
    }
    TimeZone::get(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(tz: &str, ts: &str) -> Vec<String> {
        let tz = zone(tz).unwrap();
        bucket_keys(&tz, parse_rfc3339(ts).unwrap())
            .iter()
            .map(|k| k.format())
            .collect()
    }

    #[test]
    fn utc_and_fixed_offsets() {
        assert_eq!(
            keys("UTC", "2026-11-21T10:15:30Z"),
            [
                "2026-11-21T10:15:00Z",
                "2026-11-21T10:00:00Z",
                "2026-11-21T00:00:00Z"
            ]
        );
        assert_eq!(
            keys("Asia/Kolkata", "2026-11-21T10:15:30Z"),
            [
                "2026-11-21T15:45:00+05:30",
                "2026-11-21T15:00:00+05:30",
                "2026-11-21T00:00:00+05:30"
            ]
        );
    }

    #[test]
    fn fall_back_hour_has_two_keys() {
        // 2026-11-01 in New York: 01:00-01:59 happens at -04:00 and again at -05:00.
        let first = keys("America/New_York", "2026-11-01T05:30:00Z");
        let second = keys("America/New_York", "2026-11-01T06:30:00Z");
        assert_eq!(first[1], "2026-11-01T01:00:00-04:00");
        assert_eq!(second[1], "2026-11-01T01:00:00-05:00");
        assert_eq!(first[0], "2026-11-01T01:30:00-04:00");
        assert_eq!(second[0], "2026-11-01T01:30:00-05:00");
        // The day starts before the change: one key, the -04:00 midnight.
        assert_eq!(first[2], "2026-11-01T00:00:00-04:00");
        assert_eq!(second[2], "2026-11-01T00:00:00-04:00");
    }

    #[test]
    fn spring_forward_day_and_hour() {
        // 2026-03-08 in New York: 02:00 local does not exist; 03:00 is -04:00.
        let k = keys("America/New_York", "2026-03-08T07:10:00Z");
        assert_eq!(
            k,
            [
                "2026-03-08T03:10:00-04:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T00:00:00-05:00"
            ]
        );
    }

    #[test]
    fn gap_at_midnight_uses_the_offset_before() {
        // America/Santiago springs forward at 24:00 on 2026-09-05 → day 2026-09-06 starts at 01:00.
        // Python resolves the non-existent 00:00 with fold=0 to the offset before (-04:00).
        let k = keys("America/Santiago", "2026-09-06T12:00:00Z");
        assert_eq!(k[2], "2026-09-06T00:00:00-04:00");
        assert_eq!(k[1], "2026-09-06T09:00:00-03:00");
    }

    #[test]
    fn key_round_trips_and_orders() {
        for s in [
            "2026-11-01T01:00:00-04:00",
            "2026-11-21T00:00:00+09:00",
            "1970-01-01T00:00:00Z",
        ] {
            assert_eq!(BucketKey::parse(s).unwrap().format(), s);
        }
        let a = BucketKey::parse("2026-11-01T01:00:00-04:00").unwrap();
        let b = BucketKey::parse("2026-11-01T01:00:00-05:00").unwrap();
        assert!(a.instant_secs() < b.instant_secs());
    }

    #[test]
    fn rfc3339_validation() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01T09:00:00+09:00"), Some(0));
        assert_eq!(
            parse_rfc3339("2026-11-21T07:01:55.2821394Z").map(|v| v % 1_000_000),
            Some(282_139)
        );
        assert!(parse_rfc3339("2026-02-29T00:00:00Z").is_none());
        assert!(parse_rfc3339("2026-11-21T24:00:00Z").is_none());
        assert!(parse_rfc3339("2026-11-21 10:00:00Z").is_none());
        assert!(parse_rfc3339("2026-11-21T10:00:00").is_none());
        assert!(parse_rfc3339("2026-11-21T10:00:00.Z").is_none());
        assert!(parse_rfc3339("2026-11-21T10:00:00+24:00").is_none());
        assert!(!in_range(parse_rfc3339("1969-12-31T23:59:59Z").unwrap()));
        assert!(!in_range(parse_rfc3339("2200-01-01T00:00:00Z").unwrap()));
        assert!(in_range(
            parse_rfc3339("2199-12-31T23:59:59.999999Z").unwrap()
        ));
    }

    #[test]
    fn zone_names_are_exact() {
        assert!(zone("Asia/Tokyo").is_some());
        assert!(zone("asia/tokyo").is_none());
        assert!(zone("Mars/Olympus").is_none());
        assert!(zone("UTC").is_some());
    }

    #[test]
    fn cache_agrees_with_direct_computation() {
        let tz = zone("America/New_York").unwrap();
        let mut c = BucketCache::new(tz.clone());
        let start = parse_rfc3339("2026-10-31T20:00:00Z").unwrap();
        for i in 0..5000 {
            let ts = start + i * 37_000_000;
            assert_eq!(c.keys(ts), bucket_keys(&tz, ts));
        }
    }
}
