//! A sorted map of byte keys to byte values, kept in a redb table as **pages**: each table row
//! holds a run of consecutive entries (up to [`PAGE_MAX`] bytes) under the key of its first one.
//!
//! Why: redb's cost, and the cost the engine reports as store writes, is per row. One row per
//! node meant one write per dirty node per checkpoint (0.24–0.55 per accepted event on the
//! ingest benchmark) and one `children` index row per created node. In pages, a checkpoint
//! writes one row per page its dirty nodes fall in, a few dozen nodes each. A lookup is one
//! B-tree descent to the page whose first key is the greatest at or below the key
//! (`range(..=key).next_back()`), then a walk of that page.
//!
//! Keys are order-preserving encodings of tuples of strings ([`KeyBuf`]), so a prefix of whole
//! components selects a contiguous run of entries ([`scan_prefix`]).

use std::ops::Bound;

use canopy_actors::store::{StoreError, Written};
use redb::{ReadableTable, Table};

/// A page is split when it grows past this many bytes...
pub const PAGE_MAX: usize = 32 * 1024;
/// ...into pages of about this many.
const PAGE_FILL: usize = 16 * 1024;

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("node page: {what}"))
}

/// An order-preserving encoding of a tuple of strings (and optional strings): byte order of the
/// encodings is the tuple order. A string is its bytes with 0x00 escaped as `00 FF`, then `00 01`;
/// an optional string is `00` for none, or `01` and the string.
#[derive(Debug, Default, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyBuf(pub Vec<u8>);

impl KeyBuf {
    pub fn new() -> Self {
        KeyBuf(Vec::with_capacity(48))
    }

    pub fn str(mut self, s: &str) -> Self {
        for &b in s.as_bytes() {
            if b == 0 {
                self.0.extend_from_slice(&[0, 0xFF]);
            } else {
                self.0.push(b);
            }
        }
        self.0.extend_from_slice(&[0, 1]);
        self
    }

    pub fn opt(mut self, s: Option<&str>) -> Self {
        match s {
            None => {
                self.0.push(0);
                self
            }
            Some(s) => {
                self.0.push(1);
                self.str(s)
            }
        }
    }
}

/// Reads the components of a key encoded by [`KeyBuf`].
pub struct KeyReader<'a>(&'a [u8]);

impl<'a> KeyReader<'a> {
    pub fn new(k: &'a [u8]) -> Self {
        KeyReader(k)
    }

    pub fn str(&mut self) -> Result<String, StoreError> {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let b = *self
                .0
                .get(i)
                .ok_or_else(|| corrupt("unterminated key part"))?;
            if b != 0 {
                out.push(b);
                i += 1;
                continue;
            }
            match self.0.get(i + 1) {
                Some(1) => break,
                Some(0xFF) => {
                    out.push(0);
                    i += 2;
                }
                _ => return Err(corrupt("bad key encoding")),
            }
        }
        self.0 = &self.0[i + 2..];
        String::from_utf8(out).map_err(|_| corrupt("key is not UTF-8"))
    }

    /// The bytes after the components read so far.
    pub fn rest(&self) -> &'a [u8] {
        self.0
    }

    #[cfg(test)]
    pub fn opt(&mut self) -> Result<Option<String>, StoreError> {
        let (&tag, rest) = self.0.split_first().ok_or_else(|| corrupt("short key"))?;
        self.0 = rest;
        match tag {
            0 => Ok(None),
            1 => self.str().map(Some),
            _ => Err(corrupt("bad optional key part")),
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &mut &[u8]) -> Result<usize, StoreError> {
    let mut v = 0usize;
    for shift in (0..64).step_by(7) {
        let (&x, rest) = b.split_first().ok_or_else(|| corrupt("truncated length"))?;
        *b = rest;
        v |= ((x & 0x7F) as usize) << shift;
        if x < 0x80 {
            return Ok(v);
        }
    }
    Err(corrupt("length too long"))
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], StoreError> {
    if b.len() < n {
        return Err(corrupt("truncated entry"));
    }
    let (x, rest) = b.split_at(n);
    *b = rest;
    Ok(x)
}

/// One entry of a page: `(key, value)`.
pub type Entry<'a> = (&'a [u8], &'a [u8]);

/// A page read out of the table: `(first key, page bytes)`.
type OwnedPage = (Vec<u8>, Vec<u8>);

/// A page's entries, in order, as slices into the page.
pub fn entries(page: &[u8]) -> Result<Vec<Entry<'_>>, StoreError> {
    Entries(page).collect()
}

/// Walks a page's entries without collecting them.
struct Entries<'a>(&'a [u8]);

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let mut entry = || {
            let kl = get_varint(&mut self.0)?;
            let k = take(&mut self.0, kl)?;
            let vl = get_varint(&mut self.0)?;
            let v = take(&mut self.0, vl)?;
            Ok((k, v))
        };
        let r = entry();
        if r.is_err() {
            // One error, then the end.
            self.0 = &[];
        }
        Some(r)
    }
}

fn push_entry(page: &mut Vec<u8>, k: &[u8], v: &[u8]) {
    put_varint(page, k.len());
    page.extend_from_slice(k);
    put_varint(page, v.len());
    page.extend_from_slice(v);
}

/// Calls `f` with the key and bytes of the page that holds `key`, if any page does: the one
/// stored under the greatest first key at or below `key`.
fn with_floor<T: ReadableTable<&'static [u8], &'static [u8]>, R>(
    t: &T,
    key: &[u8],
    f: impl FnOnce(&[u8], &[u8]) -> R,
) -> Result<Option<R>, StoreError> {
    let mut r = t
        .range::<&[u8]>((Bound::Unbounded, Bound::Included(key)))
        .map_err(io)?;
    match r.next_back() {
        Some(e) => {
            let (k, v) = e.map_err(io)?;
            Ok(Some(f(k.value(), v.value())))
        }
        None => Ok(None),
    }
}

/// The page that holds `key` if any page does, copied out: its first key and its bytes.
fn floor_page<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    key: &[u8],
) -> Result<Option<OwnedPage>, StoreError> {
    with_floor(t, key, |k, v| (k.to_vec(), v.to_vec()))
}

/// The first key of the page that holds `key` if any page does (without copying the page).
fn floor_key<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    with_floor(t, key, |k, _| k.to_vec())
}

/// The value stored under `key`.
pub fn get<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    let found = with_floor(t, key, |_, page| {
        for e in Entries(page) {
            let (k, v) = e?;
            match k.cmp(key) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => return Ok(Some(v.to_vec())),
                std::cmp::Ordering::Greater => break,
            }
        }
        Ok(None)
    })?;
    found.unwrap_or(Ok(None))
}

/// Calls `f` with every entry whose key starts with `prefix`, in key order.
pub fn scan_prefix<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    prefix: &[u8],
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    // The page holding the prefix's first entry starts at or below it (or at the prefix).
    let start = floor_key(t, prefix)?;
    let from = start.as_deref().unwrap_or(prefix);
    for e in t.range::<&[u8]>(from..).map_err(io)? {
        let (pk, page) = e.map_err(io)?;
        if pk.value() > prefix && !pk.value().starts_with(prefix) {
            break;
        }
        for e in Entries(page.value()) {
            let (k, v) = e?;
            if k.starts_with(prefix) {
                f(k, v)?;
            } else if k > prefix {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Removes every entry whose key is in `from..to`. Pages that lie wholly inside the range go
/// without being read; only the (at most two) pages that straddle an end are rewritten, so
/// dropping a range costs one table removal per page, not a decode per entry. Returns the table
/// rows written (removals and inserts) and their bytes (a removal's: its key).
pub fn delete_range(
    t: &mut Table<&'static [u8], &'static [u8]>,
    from: &[u8],
    to: &[u8],
) -> Result<Written, StoreError> {
    if from >= to {
        return Ok(Written::default());
    }
    // First keys of the pages that may hold keys of the range, in order.
    let mut firsts: Vec<Vec<u8>> = Vec::new();
    if let Some(k) = floor_key(t, from)? {
        firsts.push(k);
    }
    for e in t
        .range::<&[u8]>((Bound::Excluded(from), Bound::Excluded(to)))
        .map_err(io)?
    {
        let k = e.map_err(io)?.0.value().to_vec();
        if firsts.last() != Some(&k) {
            firsts.push(k);
        }
    }
    let mut rows = Written::default();
    for (i, first) in firsts.iter().enumerate() {
        // A page ends before the next page's first key: when that key is at or below `to`,
        // every entry of the page is below `to`.
        let ends_inside = firsts.get(i + 1).is_some();
        if first.as_slice() >= from && ends_inside {
            t.remove(first.as_slice()).map_err(io)?;
            rows += Written::row(first.len());
            continue;
        }
        let Some(page) = t
            .get(first.as_slice())
            .map_err(io)?
            .map(|v| v.value().to_vec())
        else {
            continue;
        };
        let all = entries(&page)?;
        let before = all.len();
        let kept: Vec<Entry> = all
            .into_iter()
            .filter(|(k, _)| *k < from || *k >= to)
            .collect();
        if kept.len() == before {
            continue;
        }
        t.remove(first.as_slice()).map_err(io)?;
        rows += Written::row(first.len());
        if let Some((k0, _)) = kept.first() {
            let mut out = Vec::with_capacity(page.len());
            for (k, v) in &kept {
                push_entry(&mut out, k, v);
            }
            t.insert(*k0, out.as_slice()).map_err(io)?;
            rows += Written::row(k0.len() + out.len());
        }
    }
    Ok(rows)
}

/// Applies `changes` (sorted by key; several for one key apply in order) to the pages of `t`:
/// for each, `f(key, old value, change)` returns the new value, or `None` to remove the entry.
/// Returns the table rows written (page inserts and removals) and their bytes.
pub fn apply<K: AsRef<[u8]>, C>(
    t: &mut Table<&'static [u8], &'static [u8]>,
    changes: &[(K, C)],
    mut f: impl FnMut(&[u8], Option<&[u8]>, &C) -> Result<Option<Vec<u8>>, StoreError>,
) -> Result<Written, StoreError> {
    debug_assert!(changes
        .windows(2)
        .all(|w| w[0].0.as_ref() <= w[1].0.as_ref()));
    let mut rows = Written::default();
    let mut i = 0;
    while i < changes.len() {
        let key = changes[i].0.as_ref();
        // The page to merge into: the one that holds `key`, else (a key below every page)
        // the first page, which then starts at `key`.
        let page = match floor_page(t, key)? {
            Some(p) => Some(p),
            None => {
                let first = t.first().map_err(io)?;
                first.map(|(k, v)| (k.value().to_vec(), v.value().to_vec()))
            }
        };
        let (old_first, bytes) = match page {
            Some((k, v)) => (Some(k), v),
            None => (None, Vec::new()),
        };
        // Changes up to the next page's first key land in this page.
        let next_first = match &old_first {
            Some(k) => {
                let mut r = t
                    .range::<&[u8]>((Bound::Excluded(k.as_slice()), Bound::Unbounded))
                    .map_err(io)?;
                match r.next() {
                    Some(e) => Some(e.map_err(io)?.0.value().to_vec()),
                    None => None,
                }
            }
            None => None,
        };
        let j = match &next_first {
            Some(nf) => i + changes[i..].partition_point(|(k, _)| k.as_ref() < nf.as_slice()),
            None => changes.len(),
        };
        let old = entries(&bytes)?;
        // The new value of each changed key, folding several changes of one key in order.
        let mut news: Vec<(&[u8], Option<Vec<u8>>)> = Vec::new();
        let mut changed = false;
        let mut c = i;
        while c < j {
            let k = changes[c].0.as_ref();
            let before = old
                .binary_search_by(|(ok, _)| (*ok).cmp(k))
                .ok()
                .map(|x| old[x].1);
            let mut cur = f(k, before, &changes[c].1)?;
            c += 1;
            while c < j && changes[c].0.as_ref() == k {
                cur = f(k, cur.as_deref(), &changes[c].1)?;
                c += 1;
            }
            changed |= cur.as_deref() != before;
            news.push((k, cur));
        }
        if !changed {
            // Deletes of absent keys, or values rewritten as they were: the page stays.
            i = j;
            continue;
        }
        // Merge the old entries with the new values, cutting pages as they fill.
        let mut merged: Vec<(&[u8], &[u8])> = Vec::with_capacity(old.len() + news.len());
        let (mut a, mut b) = (0, 0);
        while a < old.len() || b < news.len() {
            let take_new = match (old.get(a), news.get(b)) {
                (Some(o), Some(n)) => n.0 <= o.0,
                (None, Some(_)) => true,
                _ => false,
            };
            if take_new {
                let (k, v) = &news[b];
                if old.get(a).is_some_and(|o| o.0 == *k) {
                    a += 1;
                }
                if let Some(v) = v {
                    merged.push((k, v));
                }
                b += 1;
            } else {
                merged.push(old[a]);
                a += 1;
            }
        }
        let total: usize = merged.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        let mut pages: Vec<(&[u8], Vec<u8>)> = Vec::new();
        let mut cur: Vec<u8> = Vec::new();
        let mut cur_first: &[u8] = &[];
        let cut = if total > PAGE_MAX {
            PAGE_FILL
        } else {
            usize::MAX
        };
        for (k, v) in merged {
            if cur.is_empty() {
                cur_first = k;
            }
            push_entry(&mut cur, k, v);
            if cur.len() >= cut {
                pages.push((cur_first, std::mem::take(&mut cur)));
            }
        }
        if !cur.is_empty() {
            pages.push((cur_first, cur));
        }
        if let Some(of) = &old_first {
            if pages.first().is_none_or(|(k, _)| *k != of.as_slice()) {
                t.remove(of.as_slice()).map_err(io)?;
                rows += Written::row(of.len());
            }
        }
        for (k, p) in &pages {
            t.insert(*k, p.as_slice()).map_err(io)?;
            rows += Written::row(k.len() + p.len());
        }
        i = j;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use redb::{ReadableDatabase, TableDefinition};
    use std::collections::BTreeMap;

    const T: TableDefinition<&[u8], &[u8]> = TableDefinition::new("t");

    #[test]
    fn key_encoding_keeps_tuple_order_and_reads_back() {
        let tuples = [
            ("a", None, "x"),
            ("a", None, "x\0"),
            ("a", Some(""), ""),
            ("a", Some("b"), "c"),
            ("a\0", None, ""),
            ("ab", None, ""),
            ("b", Some("\0\u{1}"), "zz"),
        ];
        let enc = |t: &(&str, Option<&str>, &str)| KeyBuf::new().str(t.0).opt(t.1).str(t.2).0;
        for w in tuples.windows(2) {
            assert!(w[0] < w[1]);
            assert!(enc(&w[0]) < enc(&w[1]), "{:?} vs {:?}", w[0], w[1]);
        }
        for t in &tuples {
            let k = enc(t);
            let mut r = KeyReader::new(&k);
            assert_eq!(r.str().unwrap(), t.0);
            assert_eq!(r.opt().unwrap().as_deref(), t.1);
            assert_eq!(r.str().unwrap(), t.2);
        }
        assert!(KeyReader::new(&[b'a', 0]).str().is_err());
    }

    fn key(n: u32) -> Vec<u8> {
        KeyBuf::new().str("t").str(&format!("n{n:05}")).0
    }

    /// A range to delete after some batches, drawn from the batch itself (odd batches only).
    fn cut_between(bi: usize, batch: &[(u32, Option<usize>)]) -> Option<(u32, u32)> {
        let a = batch.first()?.0;
        let b = batch.last()?.0;
        (bi % 2 == 1).then(|| (a.min(b), a.max(b) + 1))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Random batches of puts and deletes (values of random size, so pages split and empty),
        /// and range deletes between them, give the same map as a `BTreeMap`, read back by `get` and by `scan_prefix`.
        #[test]
        fn pages_behave_like_a_sorted_map(
            batches in prop::collection::vec(
                prop::collection::vec((0u32..400, prop::option::of(0usize..3000)), 0..120),
                1..6,
            )
        ) {
            let dir = tempfile::tempdir().unwrap();
            let db = redb::Database::create(dir.path().join("p.redb")).unwrap();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for (bi, batch) in batches.iter().enumerate() {
                let mut changes: Vec<(Vec<u8>, Option<Vec<u8>>)> = batch
                    .iter()
                    .map(|(n, v)| (key(*n), v.map(|len| vec![(bi as u8).wrapping_add(*n as u8); len])))
                    .collect();
                changes.sort_by(|a, b| a.0.cmp(&b.0));
                for (k, v) in &changes {
                    match v {
                        Some(v) => { model.insert(k.clone(), v.clone()); }
                        None => { model.remove(k); }
                    }
                }
                let tx = db.begin_write().unwrap();
                {
                    let mut t = tx.open_table(T).unwrap();
                    apply(&mut t, &changes, |_, _, v| Ok(v.clone())).unwrap();
                }
                tx.commit().unwrap();
                if let Some((a, b)) = cut_between(bi, batch) {
                    let (from, to) = (key(a), key(b));
                    model.retain(|k, _| *k < from || *k >= to);
                    let tx = db.begin_write().unwrap();
                    delete_range(&mut tx.open_table(T).unwrap(), &from, &to).unwrap();
                    tx.commit().unwrap();
                }
            }
            let tx = db.begin_read().unwrap();
            let t = tx.open_table(T).unwrap();
            for n in 0..400 {
                prop_assert_eq!(get(&t, &key(n)).unwrap(), model.get(&key(n)).cloned());
            }
            let mut seen = Vec::new();
            scan_prefix(&t, &KeyBuf::new().str("t").0, |k, v| { seen.push((k.to_vec(), v.to_vec())); Ok(()) }).unwrap();
            let want: Vec<_> = model.into_iter().collect();
            prop_assert_eq!(seen, want);
            for e in t.iter().unwrap() {
                let (pk, page) = e.unwrap();
                let es = entries(page.value()).unwrap();
                prop_assert!(!es.is_empty());
                prop_assert_eq!(es[0].0, pk.value());
                prop_assert!(page.value().len() <= PAGE_MAX + 3100);
            }
        }
    }

    #[test]
    fn a_prefix_scan_stops_at_the_prefix_and_sees_old_values_in_changes() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("p.redb")).unwrap();
        let k = |t: &str, n: &str| KeyBuf::new().str(t).str(n).0;
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(T).unwrap();
            let mut ch = vec![
                (k("a", "1"), b"x".to_vec()),
                (k("ab", "1"), b"y".to_vec()),
                (k("b", "1"), b"z".to_vec()),
            ];
            ch.sort();
            apply(&mut t, &ch, |_, old, v| {
                assert!(old.is_none());
                Ok(Some(v.clone()))
            })
            .unwrap();
            // Two changes of one key: the second sees the first's value.
            let ch = vec![(k("ab", "1"), 1u8), (k("ab", "1"), 2u8)];
            let mut olds = Vec::new();
            apply(&mut t, &ch, |_, old, c| {
                olds.push(old.map(<[u8]>::to_vec));
                Ok(Some(vec![*c]))
            })
            .unwrap();
            assert_eq!(olds, vec![Some(b"y".to_vec()), Some(vec![1])]);
            // Nothing changes (an absent key deleted, a value written as it was): no page is written.
            let same = |_: &[u8], _: Option<&[u8]>, v: &Option<Vec<u8>>| Ok(v.clone());
            assert_eq!(
                apply(&mut t, &[(k("zz", "9"), None)], same).unwrap().rows,
                0
            );
            let again = [(k("a", "1"), Some(b"x".to_vec()))];
            assert_eq!(apply(&mut t, &again, same).unwrap().rows, 0);
            let changed = [(k("a", "1"), Some(b"w".to_vec()))];
            assert_eq!(apply(&mut t, &changed, same).unwrap().rows, 1);
            let back = [(k("a", "1"), Some(b"x".to_vec()))];
            assert_eq!(apply(&mut t, &back, same).unwrap().rows, 1);
        }
        tx.commit().unwrap();
        let tx = db.begin_read().unwrap();
        let t = tx.open_table(T).unwrap();
        let mut seen = Vec::new();
        scan_prefix(&t, &KeyBuf::new().str("a").0, |k, _| {
            seen.push(k.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![k("a", "1")]);
        assert_eq!(get(&t, &k("ab", "1")).unwrap(), Some(vec![2]));
    }
}
