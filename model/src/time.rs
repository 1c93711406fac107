//! Timestamps, time zones and bucket keys, from docs/SPEC.md sections 1 and 5. Instants are
//! microseconds since the Unix epoch (the contract truncates `ts` to microseconds).

use std::collections::HashSet;
use std::sync::OnceLock;

use jiff::tz::{AmbiguousOffset, TimeZone};

use crate::json::{Num, J};

pub const MICROS_PER_SEC: i64 = 1_000_000;
const SECS_PER_DAY: i64 = 86_400;
/// 2200-01-01T00:00:00Z, the first instant past the valid range.
const TS_END_SECS: i64 = 7_258_118_400;

/// A `ts` field: integer milliseconds or the exact RFC 3339 form; `None` when malformed.
pub fn parse_ts(v: &J) -> Option<i64> {
    let micros = match v {
        J::Num(Num::Int(ms)) => i64::try_from(*ms).ok()?.checked_mul(1000)?,
        J::Str(Some(s)) => parse_rfc3339(s)?,
        _ => return None,
    };
    (0..TS_END_SECS * MICROS_PER_SEC)
        .contains(&micros)
        .then_some(micros)
}

/// `YYYY-MM-DDTHH:MM:SS[.F](Z|±HH:MM)`, F of 1 to 9 digits truncated to microseconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let sep = |at: usize, c: u8| b.get(at) == Some(&c);
    if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0;
    if sep(i, b'.') {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if !(1..=9).contains(&digits) {
            return None;
        }
        // Pad or cut to six digits: truncation, never rounding.
        let six: String = s[i + 1..i + 1 + digits]
            .chars()
            .chain("00000".chars())
            .take(6)
            .collect();
        micros = six.parse::<i64>().ok()?;
        i += 1 + digits;
    }
    let offset_secs = match &b[i..] {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let secs = h * 3600 + m * 60;
            if *sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    let local =
        days_from_civil(year, month, day) * SECS_PER_DAY + hour * 3600 + minute * 60 + second;
    Some((local - offset_secs) * MICROS_PER_SEC + micros)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date, counted the slow, plain way: whole
/// years, then whole months (the model prefers obvious over fast).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let mut days = 0;
    if y >= 1970 {
        days += (1970..y)
            .map(|yy| if is_leap(yy) { 366 } else { 365 })
            .sum::<i64>();
    } else {
        days -= (y..1970)
            .map(|yy| if is_leap(yy) { 366 } else { 365 })
            .sum::<i64>();
    }
    days + (1..m).map(|mm| days_in_month(y, mm)).sum::<i64>() + d - 1
}

/// The civil date and time of `secs` seconds of local time since 1970-01-01T00:00:00.
fn civil(secs: i64) -> (i64, i64, i64, i64, i64, i64) {
    let mut days = secs.div_euclid(SECS_PER_DAY);
    let tod = secs.rem_euclid(SECS_PER_DAY);
    let mut y = 1970;
    loop {
        let len = if is_leap(y) { 366 } else { 365 };
        if days < 0 {
            y -= 1;
            days += if is_leap(y) { 366 } else { 365 };
        } else if days >= len {
            days -= len;
            y += 1;
        } else {
            break;
        }
    }
    let mut m = 1;
    while days >= days_in_month(y, m) {
        days -= days_in_month(y, m);
        m += 1;
    }
    (y, m, days + 1, tod / 3600, tod % 3600 / 60, tod % 60)
}

/// A zone by its exact, case-sensitive IANA name (or `UTC`), from the bundled database.
pub fn zone(name: &str) -> Option<TimeZone> {
    static NAMES: OnceLock<HashSet<String>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        jiff::tz::db()
            .available()
            .map(|n| n.as_str().to_string())
            .collect()
    });
    if name == "UTC" {
        return Some(TimeZone::UTC);
    }
    names
        .contains(name)
        .then(|| TimeZone::get(name).ok())
        .flatten()
}

fn offset_at(tz: &TimeZone, secs: i64) -> i64 {
    let ts = jiff::Timestamp::from_second(secs).expect("ts is inside jiff's range");
    i64::from(tz.to_offset(ts).seconds())
}

/// What the zone says about a local time: one offset, or (before, after) a transition when the
/// local time is repeated (a fold) or skipped (a gap).
fn local_offsets(tz: &TimeZone, local_secs: i64) -> Result<i64, (i64, i64)> {
    let (y, mo, d, h, mi, s) = civil(local_secs);
    let dt = jiff::civil::DateTime::new(y as i16, mo as i8, d as i8, h as i8, mi as i8, s as i8, 0)
        .expect("a valid civil time");
    match tz.to_ambiguous_timestamp(dt).offset() {
        AmbiguousOffset::Unambiguous { offset } => Ok(i64::from(offset.seconds())),
        AmbiguousOffset::Gap { before, after } | AmbiguousOffset::Fold { before, after } => {
            Err((i64::from(before.seconds()), i64::from(after.seconds())))
        }
    }
}

/// The bucket keys (minute, hour, day) of an instant in a zone, following Python `zoneinfo`
/// as docs/SPEC.md section 5 states: the event's local time is in its second pass (`fold`)
/// when it is repeated and the instant carries the later offset; minute and hour starts are
/// resolved with the event's fold, the day start with fold 0; in a fold or a gap, fold 0 takes
/// the offset before the transition and fold 1 the one after.
pub fn bucket_keys(tz: &TimeZone, micros: i64) -> [String; 3] {
    let secs = micros.div_euclid(MICROS_PER_SEC);
    let offset = offset_at(tz, secs);
    let local = secs + offset;
    let fold = matches!(local_offsets(tz, local), Err((before, after)) if after == offset && before != offset);
    let key = |start: usize, fold: bool| {
        let start = local - local.rem_euclid(start as i64);
        let off = match local_offsets(tz, start) {
            Ok(o) => o,
            Err((before, after)) => {
                if fold {
                    after
                } else {
                    before
                }
            }
        };
        format_key(start, off)
    };
    [
        key(60, fold),
        key(3600, fold),
        key(SECS_PER_DAY as usize, false),
    ]
}

/// `YYYY-MM-DDTHH:MM:SS` of the local start, then `Z` or `±HH:MM` (seconds of an offset dropped).
fn format_key(local_secs: i64, offset: i64) -> String {
    let (y, mo, d, h, mi, s) = civil(local_secs);
    let zone = if offset == 0 {
        "Z".to_string()
    } else {
        let sign = if offset > 0 { '+' } else { '-' };
        let a = offset.abs();
        format!("{sign}{:02}:{:02}", a / 3600, a % 3600 / 60)
    };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{zone}")
}

/// The instant (ms since the epoch) a bucket key names.
pub fn key_start_ms(key: &str) -> Option<i64> {
    // A key has no fraction; the RFC 3339 parser accepts exactly its form.
    parse_rfc3339(key).map(|us| us.div_euclid(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(zone_name: &str, ts: &str) -> [String; 3] {
        bucket_keys(&zone(zone_name).unwrap(), parse_rfc3339(ts).unwrap())
    }

    /// The table of docs/SPEC.md section 5.
    #[test]
    fn dst_examples_of_the_spec() {
        let rows = [
            (
                "America/New_York",
                "2026-11-01T05:30:00Z",
                "2026-11-01T01:30:00-04:00",
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T00:00:00-04:00",
            ),
            (
                "America/New_York",
                "2026-11-01T06:30:00Z",
                "2026-11-01T01:30:00-05:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T00:00:00-04:00",
            ),
            (
                "America/New_York",
                "2026-03-08T07:10:00Z",
                "2026-03-08T03:10:00-04:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T00:00:00-05:00",
            ),
            (
                "America/Santiago",
                "2026-09-06T12:00:00Z",
                "2026-09-06T09:00:00-03:00",
                "2026-09-06T09:00:00-03:00",
                "2026-09-06T00:00:00-04:00",
            ),
        ];
        for (z, ts, m, h, d) in rows {
            assert_eq!(keys(z, ts), [m, h, d].map(String::from), "{z} {ts}");
        }
        assert_eq!(
            keys("UTC", "2026-11-21T10:15:30.999Z")[0],
            "2026-11-21T10:15:00Z"
        );
        // 15:45:30 local: the hour starts at 15:00 local, half past a UTC hour.
        assert_eq!(
            keys("Asia/Kolkata", "2026-11-21T10:15:30Z")[1],
            "2026-11-21T15:00:00+05:30"
        );
    }

    #[test]
    fn timestamps() {
        let at = |s: &str| parse_ts(&J::string(s));
        assert_eq!(at("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(at("1970-01-01T09:00:00.0000019+09:00"), Some(1));
        assert_eq!(
            at("2199-12-31T23:59:59.999999Z"),
            Some(TS_END_SECS * MICROS_PER_SEC - 1)
        );
        assert_eq!(parse_ts(&J::int(1500)), Some(1_500_000));
        for bad in [
            "2200-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-02-29T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:00:60Z",
            "2026-01-01t00:00:00Z",
            "2026-01-01T00:00:00z",
            "2026-01-01T00:00:00.Z",
            "2026-01-01T00:00:00.1234567890Z",
            "2026-01-01T00:00:00+24:00",
            "2026-01-01T00:00:00",
        ] {
            assert_eq!(at(bad), None, "{bad}");
        }
        assert_eq!(parse_ts(&J::int(-1)), None);
        assert_eq!(parse_ts(&J::int(i128::from(TS_END_SECS) * 1000)), None);
        assert_eq!(parse_ts(&J::Bool(true)), None);
    }

    #[test]
    fn civil_round_trips() {
        for days in [-800, -1, 0, 59, 365, 11_016, 20_000, 84_000] {
            let (y, m, d, ..) = civil(days * SECS_PER_DAY + 5);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn zone_names_are_exact() {
        assert!(zone("Asia/Tokyo").is_some());
        assert!(zone("asia/tokyo").is_none());
        assert!(zone("Mars/Olympus").is_none());
        assert!(zone("UTC").is_some());
    }
}
