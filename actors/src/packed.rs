//! The compact encoding of a node's bucket set ([`crate::store::PackedBuckets`]).
//!
//! A checkpoint rewrites the whole set of most nodes, so its size is most of what a checkpoint
//! costs: the node encodes it, the store copies it into B-tree pages and writes it out. The
//! MessagePack form (`[kind, granularity, key, [events, [[name, [count, sum, min, max]]...]]]`)
//! repeated every metric name in every bucket and wrote each 64-bit key in 9 bytes: ~50 bytes
//! for a bucket of the benchmark. This form writes the same numbers in under two fifths of that:
//!
//! ```text
//! set     := section*                          (sections in increasing group order)
//! section := group n bucket{n}                 group = kind * 3 + granularity
//! bucket  := key events m metric{m}
//! key     := v(Δminutes << 1 | offset_changed) [v(offset)]   (key = minutes << 20 | offset)
//! metric  := name v(count << 1 | single) (z(value) | z(sum) z(min) z(max))
//! name    := v(index)                          an index into the names seen so far in this set,
//!          | v(seen) v(len) bytes              or, equal to their number, a new name
//! ```
//!
//! `v` is an unsigned LEB128 varint, `z` a zig-zag signed one (up to 128 bits, so any exact sum
//! fits). `single` says that sum, min and max are one value, as for every bucket one event made.
//! Keys are delta-coded per section (wrapping, so any order round-trips); the offset bits of a
//! [`crate::time::BucketKey`] are written only when they change (a DST switch).

use crate::agg::{Agg, MetricName, Stat};
use crate::store::StoreError;

/// One bucket as the set holds it: (kind, granularity, key, aggregate).
pub type SetBucket = (u8, u8, u64, Agg);

/// Up to this many distinct names in a set, a name is looked up by scanning them (a set
/// nearly always has a handful); past it, through a hash index.
const NAMES_SCAN_MAX: usize = 16;

const OFFSET_BITS: u32 = 20;
const OFFSET_MASK: u64 = (1 << OFFSET_BITS) - 1;

/// Writes a bucket set. Buckets must come grouped by (kind, granularity) in increasing order
/// (a set's natural order); within a group any key order round-trips.
pub struct Encoder<'a> {
    out: Vec<u8>,
    names: Vec<&'a str>,
    /// The index of each name in `names`, once there are more than [`NAMES_SCAN_MAX`]: a scan
    /// per metric made a set of n distinct names cost n² (issue 24).
    index: Option<std::collections::HashMap<&'a str, usize>>,
    group: Option<u8>,
    /// Where the current section's bucket count goes, and how many it has so far.
    count_at: usize,
    in_section: u64,
    prev: u64,
    count: usize,
}

impl<'a> Encoder<'a> {
    /// An encoder with room for about `buckets` buckets.
    pub fn with_capacity(buckets: usize) -> Self {
        Encoder {
            // ~12–20 bytes for a bucket of one or two metrics.
            out: Vec::with_capacity(8 + buckets * 20),
            names: Vec::new(),
            index: None,
            group: None,
            count_at: 0,
            in_section: 0,
            prev: 0,
            count: 0,
        }
    }

    pub fn push(&mut self, kind: u8, granularity: u8, key: u64, agg: &'a Agg) {
        let group = kind * 3 + granularity;
        if self.group != Some(group) {
            debug_assert!(self.group.is_none_or(|g| g < group), "groups out of order");
            self.close_section();
            self.group = Some(group);
            self.out.push(group);
            self.count_at = self.out.len();
            self.in_section = 0;
            self.prev = 0;
        }
        let (mins, off) = (key >> OFFSET_BITS, key & OFFSET_MASK);
        let (pmins, poff) = (self.prev >> OFFSET_BITS, self.prev & OFFSET_MASK);
        let changed = off != poff;
        varint(
            &mut self.out,
            (mins.wrapping_sub(pmins) as u128) << 1 | changed as u128,
        );
        if changed {
            varint(&mut self.out, off as u128);
        }
        self.prev = key;
        varint(&mut self.out, agg.events as u128);
        varint(&mut self.out, agg.metrics.len() as u128);
        for (name, s) in &agg.metrics {
            self.name(name);
            let single = s.sum == s.min as i128 && s.min == s.max;
            varint(&mut self.out, (s.count as u128) << 1 | single as u128);
            if single {
                zigzag(&mut self.out, s.min as i128);
            } else {
                zigzag(&mut self.out, s.sum);
                zigzag(&mut self.out, s.min as i128);
                zigzag(&mut self.out, s.max as i128);
            }
        }
        self.in_section += 1;
        self.count += 1;
    }

    fn name(&mut self, name: &'a MetricName) {
        let seen = match &self.index {
            Some(ix) => ix.get(&**name).copied(),
            None => self.names.iter().position(|n| **n == **name),
        };
        match seen {
            Some(i) => varint(&mut self.out, i as u128),
            None => {
                varint(&mut self.out, self.names.len() as u128);
                varint(&mut self.out, name.len() as u128);
                self.out.extend_from_slice(name.as_bytes());
                if let Some(ix) = &mut self.index {
                    ix.insert(name, self.names.len());
                }
                self.names.push(name);
                if self.index.is_none() && self.names.len() > NAMES_SCAN_MAX {
                    let ix = self
                        .names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| (*n, i))
                        .collect();
                    self.index = Some(ix);
                }
            }
        }
    }

    /// Inserts the finished section's bucket count at its head (sections are short, so the
    /// shift is a few bytes of a small buffer).
    fn close_section(&mut self) {
        if self.group.is_some() {
            let mut n = Vec::with_capacity(3);
            varint(&mut n, self.in_section as u128);
            self.out
                .splice(self.count_at..self.count_at, n.iter().copied());
        }
    }

    /// The encoded set and its number of buckets.
    pub fn finish(mut self) -> (Vec<u8>, usize) {
        self.close_section();
        (self.out, self.count)
    }
}

/// Encodes a set given in (kind, granularity) order.
pub fn encode(set: &[SetBucket]) -> (Vec<u8>, usize) {
    let mut e = Encoder::with_capacity(set.len());
    for (kd, g, key, agg) in set {
        e.push(*kd, *g, *key, agg);
    }
    e.finish()
}

/// Decodes a set written by [`Encoder`].
pub fn decode(bytes: &[u8]) -> Result<Vec<SetBucket>, StoreError> {
    let mut r = Reader { b: bytes, at: 0 };
    let mut names: Vec<MetricName> = Vec::new();
    let mut out = Vec::new();
    let mut last_group: Option<u8> = None;
    while r.at < r.b.len() {
        let group = r.byte()?;
        if group >= 6 || last_group.is_some_and(|g| g >= group) {
            return Err(r.corrupt(format!("bucket group {group} out of order or unknown")));
        }
        last_group = Some(group);
        let (kind, granularity) = (group / 3, group % 3);
        let n = r.u64()?;
        let mut prev = 0u64;
        for _ in 0..n {
            let head = r.u128()?;
            let dmins = u64::try_from(head >> 1).map_err(|_| r.corrupt("key delta".into()))?;
            let mins = (prev >> OFFSET_BITS).wrapping_add(dmins);
            let off = if head & 1 == 1 {
                let off = r.u64()?;
                if off > OFFSET_MASK {
                    return Err(r.corrupt(format!("key offset {off}")));
                }
                off
            } else {
                prev & OFFSET_MASK
            };
            let key = mins << OFFSET_BITS | off;
            prev = key;
            let events = r.u64()?;
            let m = r.u64()? as usize;
            let mut metrics = crate::agg::Metrics::with_capacity(m.min(64));
            for _ in 0..m {
                let i = r.u64()? as usize;
                let name = match i.cmp(&names.len()) {
                    std::cmp::Ordering::Less => names[i],
                    std::cmp::Ordering::Equal => {
                        let len = r.u64()? as usize;
                        let s = std::str::from_utf8(r.take(len)?)
                            .map_err(|e| r.corrupt(format!("metric name: {e}")))?;
                        let name = MetricName::intern(s);
                        names.push(name);
                        name
                    }
                    std::cmp::Ordering::Greater => {
                        return Err(r.corrupt(format!("metric name index {i}")));
                    }
                };
                let head = r.u128()?;
                let count =
                    u64::try_from(head >> 1).map_err(|_| r.corrupt("metric count".into()))?;
                let stat = if head & 1 == 1 {
                    let v = r.i64()?;
                    Stat {
                        count,
                        sum: v as i128,
                        min: v,
                        max: v,
                    }
                } else {
                    Stat {
                        count,
                        sum: r.i128()?,
                        min: r.i64()?,
                        max: r.i64()?,
                    }
                };
                metrics.push((name, stat));
            }
            out.push((kind, granularity, key, Agg { events, metrics }));
        }
    }
    Ok(out)
}

fn varint(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(out: &mut Vec<u8>, v: i128) {
    varint(out, ((v << 1) ^ (v >> 127)) as u128);
}

struct Reader<'b> {
    b: &'b [u8],
    at: usize,
}

impl<'b> Reader<'b> {
    fn corrupt(&self, what: String) -> StoreError {
        StoreError::Corrupt(format!("packed buckets, byte {}: {what}", self.at))
    }

    fn byte(&mut self) -> Result<u8, StoreError> {
        let b = *self
            .b
            .get(self.at)
            .ok_or_else(|| self.corrupt("truncated".into()))?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'b [u8], StoreError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| self.corrupt("truncated".into()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u128(&mut self) -> Result<u128, StoreError> {
        let mut v = 0u128;
        for shift in (0..128).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u128) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.corrupt("varint longer than 128 bits".into()))
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        let v = self.u128()?;
        u64::try_from(v).map_err(|_| self.corrupt(format!("{v} does not fit in 64 bits")))
    }

    fn i128(&mut self) -> Result<i128, StoreError> {
        let z = self.u128()?;
        Ok((z >> 1) as i128 ^ -((z & 1) as i128))
    }

    fn i64(&mut self) -> Result<i64, StoreError> {
        let v = self.i128()?;
        i64::try_from(v).map_err(|_| self.corrupt(format!("{v} does not fit in 64 bits")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::BucketKey;

    fn agg(metrics: &[(&str, &[i64])]) -> Agg {
        let mut a = Agg::default();
        for (name, vals) in metrics {
            for v in *vals {
                a.add_event(&[(MetricName::intern(name), *v)]);
            }
        }
        a
    }

    #[test]
    fn a_set_round_trips_extremes_huge_sums_and_dst_keys() {
        let big = agg(&[("amount", &[i64::MAX, i64::MAX, i64::MIN])]);
        let key = |s: &str| BucketKey::parse(s).unwrap().0;
        let set: Vec<SetBucket> = vec![
            (
                0,
                0,
                key("2026-11-01T01:00:00-04:00"),
                agg(&[("amount", &[5])]),
            ),
            // The same local minute after the clocks went back: only the offset changes.
            (
                0,
                0,
                key("2026-11-01T01:00:00-05:00"),
                agg(&[("amount", &[-7, 3])]),
            ),
            (0, 0, key("2026-11-01T01:05:00-05:00"), big.clone()),
            (
                0,
                2,
                key("2026-11-01T00:00:00-04:00"),
                agg(&[("a", &[1]), ("b", &[2, 2])]),
            ),
            (1, 1, 7, agg(&[("b", &[0]), ("zz", &[i64::MIN])])),
            (1, 1, 3, Agg::default()), // keys out of order still round-trip
        ];
        let (bytes, n) = encode(&set);
        assert_eq!(n, set.len());
        assert_eq!(decode(&bytes).unwrap(), set);
        assert_eq!(decode(&[]).unwrap(), vec![]);
    }

    #[test]
    fn a_bucket_of_the_benchmark_takes_under_two_fifths_of_its_messagepack_bytes() {
        let start = BucketKey::parse("2026-03-01T10:00:00+09:00").unwrap().0;
        let set: Vec<SetBucket> = (0..100u64)
            .map(|i| {
                let a = agg(&[("amount", &[40_000 + i as i64, 77]), ("items", &[3])]);
                (0, 0, start + (i << OFFSET_BITS), a)
            })
            .collect();
        let (bytes, _) = encode(&set);
        let old = rmp_serde::to_vec(&set).unwrap();
        assert!(
            bytes.len() * 5 <= old.len() * 2,
            "{} vs {}",
            bytes.len(),
            old.len()
        );
    }

    #[test]
    fn damaged_bytes_are_refused_not_misread() {
        let set: Vec<SetBucket> = vec![(0, 1, 1 << OFFSET_BITS, agg(&[("amount", &[5, 9])]))];
        let (bytes, _) = encode(&set);
        for cut in 1..bytes.len() {
            assert!(
                matches!(decode(&bytes[..cut]), Err(StoreError::Corrupt(_))),
                "cut at {cut}"
            );
        }
        // A group out of order, an unknown group, a name index never defined.
        let mut twice = bytes.clone();
        twice.extend_from_slice(&bytes);
        assert!(decode(&twice).is_err());
        assert!(decode(&[6, 0]).is_err());
        assert!(decode(&[0, 1, 0, 1, 1, 3, 2, 2]).is_err());
    }
}
