//! Aggregates: the numbers every node owns (docs/SPEC.md section 4).
//!
//! `Agg` is `{"events", "metrics": {name: {count, sum, min, max}}}`. Sums are i128 so they never
//! overflow for any realistic stream of i64 values. Metric names are interned once per process
//! ([`MetricName`]), so the hot path compares pointers before bytes.

use serde::ser::{SerializeMap, Serializer};
use serde::{de, Deserialize, Deserializer, Serialize};
use smallvec::SmallVec;

/// Statistics of one metric inside an aggregate.
///
/// Packed to 8-byte alignment: an `i128` would align the struct to 16 bytes and pad it from
/// 40 to 48, and every bucket holds up to two of these inline (see [`Metrics`]). Fields are
/// read and written by value (a reference to `sum` is not allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(C, packed(8))]
pub struct Stat {
    pub count: u64,
    #[serde(with = "sum_codec")]
    pub sum: i128,
    pub min: i64,
    pub max: i64,
}

impl Stat {
    pub fn of(v: i64) -> Self {
        Stat {
            count: 1,
            sum: v as i128,
            min: v,
            max: v,
        }
    }

    pub fn add(&mut self, v: i64) {
        self.count += 1;
        self.sum += v as i128;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, o: &Stat) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }
}

/// How a sum is encoded. In JSON (human-readable) it is a plain number, however large. In
/// MessagePack (the stores) it is an integer when it fits in 64 bits, which nearly every sum
/// does, and the 16 big-endian bytes of the i128 otherwise: rmp-serde writes every i128 as
/// those 16 bytes (18 with the header), which made the sums a fifth of a stored bucket. Both
/// forms are read back, so rows written before the change still load.
mod sum_codec {
    use serde::de::{self, Deserializer, Visitor};
    use serde::{Deserialize, Serializer};

    pub fn serialize<S: Serializer>(v: &i128, s: S) -> Result<S::Ok, S::Error> {
        match i64::try_from(*v) {
            Ok(small) if !s.is_human_readable() => s.serialize_i64(small),
            _ => s.serialize_i128(*v),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
        if d.is_human_readable() {
            return i128::deserialize(d);
        }
        d.deserialize_any(SumVisitor)
    }

    struct SumVisitor;

    impl<'de> Visitor<'de> for SumVisitor {
        type Value = i128;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer, or the 16 big-endian bytes of an i128")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i128, E> {
            Ok(v as i128)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i128, E> {
            Ok(v as i128)
        }

        fn visit_i128<E: de::Error>(self, v: i128) -> Result<i128, E> {
            Ok(v)
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<i128, E> {
            let b: [u8; 16] = v
                .try_into()
                .map_err(|_| E::invalid_length(v.len(), &self))?;
            Ok(i128::from_be_bytes(b))
        }
    }
}

/// A metric name, interned once for the life of the process.
///
/// Every bucket of every node carries its metrics' names. As `Arc<str>` (until 2026-12-06)
/// each bucket created, merged into a new key or dropped changed the reference count of the
/// same few names, from both worker threads at once: one contended cache line under every
/// round. An interned name is a pointer: copying it costs nothing and equal names are equal
/// pointers. The cost is that a name, once seen, is never freed; names are short and a tenant
/// has a handful, and every name seen is also in some aggregate and in the store.
///
/// The pointer is thin (to a leaked `&'static str`): a fat `&'static str` made every metric slot
/// of every bucket 8 bytes larger, and buckets are most of what a node holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MetricName(&'static &'static str);

impl MetricName {
    /// The interned name equal to `s` (interned now if it is new).
    pub fn intern(s: &str) -> MetricName {
        static NAMES: std::sync::LazyLock<
            std::sync::Mutex<std::collections::HashMap<&'static str, &'static &'static str>>,
        > = std::sync::LazyLock::new(Default::default);
        let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = names.get(s) {
            return MetricName(n);
        }
        let n: &'static str = Box::leak(s.into());
        let thin: &'static &'static str = Box::leak(Box::new(n));
        names.insert(n, thin);
        MetricName(thin)
    }

    /// Whether both are the same interned name (a pointer comparison).
    pub fn same(self, o: MetricName) -> bool {
        std::ptr::eq(self.0, o.0)
    }
}

impl std::ops::Deref for MetricName {
    type Target = str;
    fn deref(&self) -> &str {
        self.0
    }
}

impl From<&str> for MetricName {
    fn from(s: &str) -> MetricName {
        MetricName::intern(s)
    }
}

impl std::borrow::Borrow<str> for MetricName {
    fn borrow(&self) -> &str {
        self.0
    }
}

impl std::fmt::Debug for MetricName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.0, f)
    }
}

impl std::fmt::Display for MetricName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl Serialize for MetricName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for MetricName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = MetricName;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a metric name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MetricName, E> {
                Ok(MetricName::intern(v))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<MetricName, E> {
                std::str::from_utf8(v)
                    .map(MetricName::intern)
                    .map_err(|_| E::invalid_value(de::Unexpected::Bytes(v), &self))
            }
        }
        d.deserialize_str(V)
    }
}

/// An aggregate's metrics, sorted by name. The first two live inside the aggregate itself:
/// most aggregates are buckets, most buckets carry one or two metrics, and a heap vector
/// cost every bucket an allocation of its own (and a cache miss when a round merges into it).
pub type Metrics = SmallVec<[(MetricName, Stat); 2]>;

/// One aggregate. Metrics are kept sorted by name in a small vector: a node rarely has more
/// than a handful of metrics, and a sorted vec beats a map for that size.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agg {
    pub events: u64,
    pub metrics: Metrics,
}

/// Up to this many metrics, a lookup first scans for the interned pointer (a list this short
/// is a cache line or two). Past it, the scan made every lookup linear, and one event with n
/// names cost n² (issue 24: 100,000 names ran for minutes).
const SCAN_MAX: usize = 8;

/// Up to this many incoming metrics, `add_event` and `merge` look each one up and insert it:
/// the hot path, since an event or a bucket carries one to four. Past it, the incoming list
/// is sorted (when it is not already) and merged in one pass, so a record or a delta with n
/// names costs O(n log n + m), not an O(m) insert per name.
const INSERT_MAX: usize = 4;

fn find(metrics: &[(MetricName, Stat)], name: &MetricName) -> Result<usize, usize> {
    // Fast path: interned pointer equality on a short linear scan.
    if metrics.len() <= SCAN_MAX {
        if let Some(i) = metrics.iter().position(|(n, _)| n.same(*name)) {
            return Ok(i);
        }
    }
    metrics.binary_search_by(|(n, _)| (**n).cmp(&**name))
}

/// Merges `incoming` (any order, a name may repeat) into `metrics`, which is sorted by name:
/// one sort of `incoming` unless it is sorted already, then one pass over both lists.
fn merge_many<T: Clone>(
    metrics: &mut Metrics,
    incoming: &[(MetricName, T)],
    new: impl Fn(&T) -> Stat,
    add: impl Fn(&mut Stat, &T),
) {
    let sorted_copy: Vec<(MetricName, T)>;
    let incoming = if incoming.windows(2).all(|w| *w[0].0 <= *w[1].0) {
        incoming
    } else {
        let mut v = incoming.to_vec();
        v.sort_by_key(|a| a.0);
        sorted_copy = v;
        &sorted_copy
    };
    // How many distinct names are new here: the vector grows exactly once, by that much.
    let (mut i, mut fresh) = (0, 0);
    let mut prev: Option<&str> = None;
    for (n, _) in incoming {
        if prev == Some(&**n) {
            continue;
        }
        prev = Some(n);
        while i < metrics.len() && *metrics[i].0 < **n {
            i += 1;
        }
        if i == metrics.len() || *metrics[i].0 != **n {
            fresh += 1;
        }
    }
    if fresh == 0 {
        let mut i = 0;
        for (n, x) in incoming {
            while *metrics[i].0 < **n {
                i += 1;
            }
            add(&mut metrics[i].1, x);
        }
        return;
    }
    let mut out = Metrics::with_capacity(metrics.len() + fresh);
    let mut old = std::mem::take(metrics).into_iter().peekable();
    for (n, x) in incoming {
        while let Some(m) = old.next_if(|(m, _)| **m < **n) {
            out.push(m);
        }
        // A name repeated in `incoming` (or just merged with the old entry) is the last one.
        if let Some((last, s)) = out.last_mut() {
            if **last == **n {
                add(s, x);
                continue;
            }
        }
        match old.next_if(|(m, _)| **m == **n) {
            Some((m, mut s)) => {
                add(&mut s, x);
                out.push((m, s));
            }
            None => out.push((*n, new(x))),
        }
    }
    out.extend(old);
    *metrics = out;
}

impl Agg {
    pub fn is_empty(&self) -> bool {
        self.events == 0 && self.metrics.is_empty()
    }

    pub fn add_event(&mut self, metrics: &[(MetricName, i64)]) {
        self.events += 1;
        if metrics.len() > INSERT_MAX {
            merge_many(
                &mut self.metrics,
                metrics,
                |v| Stat::of(*v),
                |s, v| s.add(*v),
            );
            return;
        }
        if self.metrics.is_empty() {
            // Exactly: a first push would reserve room for 4 (256 bytes), and most aggregates
            // never get more metrics than their first event brought.
            self.metrics.reserve_exact(metrics.len());
        }
        for (name, v) in metrics {
            match find(&self.metrics, name) {
                Ok(i) => self.metrics[i].1.add(*v),
                Err(i) => self.metrics.insert(i, (*name, Stat::of(*v))),
            }
        }
    }

    pub fn merge(&mut self, o: &Agg) {
        self.events += o.events;
        if o.metrics.len() > INSERT_MAX {
            merge_many(&mut self.metrics, &o.metrics, |s| *s, |a, s| a.merge(s));
            return;
        }
        if self.metrics.is_empty() {
            self.metrics.reserve_exact(o.metrics.len());
        }
        for (name, s) in &o.metrics {
            match find(&self.metrics, name) {
                Ok(i) => self.metrics[i].1.merge(s),
                Err(i) => self.metrics.insert(i, (*name, *s)),
            }
        }
    }

    pub fn stat(&self, name: &str) -> Option<&Stat> {
        self.metrics
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| &self.metrics[i].1)
    }

    /// Subtracts the additive parts of `o` (events, count, sum). Returns the metric names whose
    /// min or max may have been determined by `o` and therefore must be recomputed by the caller.
    /// Metrics whose count falls to zero are removed (docs/SPEC.md section 4: a metric with count 0 is absent).
    pub fn subtract(&mut self, o: &Agg) -> Vec<MetricName> {
        self.events -= o.events;
        let mut tainted = Vec::new();
        let mut emptied = false;
        for (name, s) in &o.metrics {
            if let Ok(i) = find(&self.metrics, name) {
                let mine = &mut self.metrics[i].1;
                mine.count -= s.count;
                mine.sum -= s.sum;
                if mine.count == 0 {
                    emptied = true;
                } else if mine.min == s.min || mine.max == s.max {
                    tainted.push(*name);
                }
            }
        }
        // One pass for all emptied metrics: removing each in place shifted the rest every time,
        // quadratic for an aggregate with tens of thousands of names.
        if emptied {
            self.metrics.retain(|(_, s)| s.count != 0);
        }
        tainted
    }

    /// Sets min/max of `name` to exactly `mm` (the recomputed extremes).
    pub fn set_extremes(&mut self, name: &str, mm: (i64, i64)) {
        if let Ok(i) = self.metrics.binary_search_by(|(n, _)| (**n).cmp(name)) {
            self.metrics[i].1.min = mm.0;
            self.metrics[i].1.max = mm.1;
        }
    }

    /// The dump/API JSON shape: `{"events": n, "metrics": {name: {count,sum,min,max}}}`.
    /// (A string, not a `serde_json::Value`: a `Value` cannot hold sums beyond 64 bits.)
    pub fn to_json(&self) -> String {
        serde_json::to_string(&AggJson(self)).expect("aggregate serializes")
    }
}

/// Serializes an `Agg` in the dump/API shape (metrics as an object keyed by name).
pub struct AggJson<'a>(pub &'a Agg);

impl Serialize for AggJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Metrics<'a>(&'a [(MetricName, Stat)]);
        impl Serialize for Metrics<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(self.0.len()))?;
                for (name, st) in self.0 {
                    m.serialize_entry(&**name, st)?;
                }
                m.end()
            }
        }
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("events", &self.0.events)?;
        m.serialize_entry("metrics", &Metrics(&self.0.metrics))?;
        m.end()
    }
}

/// Buckets of one granularity: a vector sorted by key. Event time mostly moves forward, so an
/// insert is usually an append, and a delta of a few buckets is one small allocation (a B-tree
/// allocated a 2 KB leaf for a single entry, which dominated the node actors' memory traffic).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketMap(pub Vec<(u64, Agg)>);

/// Bucket keys per granularity, sorted and without repeats.
pub type KeySet = [Vec<u64>; 3];

impl BucketMap {
    fn find(&self, k: u64) -> Result<usize, usize> {
        // Fast path: the newest bucket.
        match self.0.last() {
            Some((last, _)) if *last == k => Ok(self.0.len() - 1),
            Some((last, _)) if *last < k => Err(self.0.len()),
            _ => self.0.binary_search_by_key(&k, |(key, _)| *key),
        }
    }

    pub fn get(&self, k: &u64) -> Option<&Agg> {
        self.find(*k).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, k: &u64) -> Option<&mut Agg> {
        match self.find(*k) {
            Ok(i) => Some(&mut self.0[i].1),
            Err(_) => None,
        }
    }

    pub fn entry(&mut self, k: u64) -> &mut Agg {
        let i = match self.find(k) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (k, Agg::default()));
                i
            }
        };
        &mut self.0[i].1
    }

    pub fn remove(&mut self, k: &u64) {
        if let Ok(i) = self.find(*k) {
            self.0.remove(i);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u64, &Agg)> {
        self.0.iter().map(|(k, a)| (k, a))
    }

    pub fn merge(&mut self, o: &BucketMap) {
        let (Some((first, _)), Some((last, _))) = (o.0.first(), self.0.last()) else {
            // Deltas mostly carry one bucket per granularity; a first push would reserve 4.
            self.0.reserve_exact(o.0.len());
            self.0.extend(o.0.iter().cloned());
            return;
        };
        // Event time mostly moves forward: `o` starts at or after the newest bucket here.
        if first >= last {
            let mut rest = &o.0[..];
            if first == last {
                let n = self.0.len();
                self.0[n - 1].1.merge(&o.0[0].1);
                rest = &o.0[1..];
            }
            self.0.reserve_exact(rest.len());
            self.0.extend(rest.iter().cloned());
            return;
        }
        // Interleaved keys (a parent merging its children's deltas): one pass over both sorted
        // lists, instead of an insert (and a shift of everything after it) per new key.
        let fresh = count_missing(&self.0, &o.0);
        if fresh == 0 {
            let mut i = 0;
            for (k, a) in &o.0 {
                while self.0[i].0 < *k {
                    i += 1;
                }
                self.0[i].1.merge(a);
            }
            return;
        }
        // Fresh keys: grow by exactly that many slots and merge from the back, so every bucket
        // moves at most once and no second vector is allocated (a new vector per merge was
        // most of the memory a round touched, and first-touched memory is slow here).
        let n = self.0.len();
        self.0.reserve_exact(fresh);
        self.0.resize_with(n + fresh, Default::default);
        // Invariant: slots `m..w` hold placeholders; `..m` are this map's unmoved buckets and
        // `w..` the merged tail.
        let (mut m, mut w) = (n, n + fresh);
        for (k, a) in o.0.iter().rev() {
            while m > 0 && self.0[m - 1].0 > *k {
                m -= 1;
                w -= 1;
                self.0.swap(m, w);
            }
            w -= 1;
            if m > 0 && self.0[m - 1].0 == *k {
                m -= 1;
                self.0[m].1.merge(a);
                self.0.swap(m, w);
            } else {
                self.0[w] = (*k, a.clone());
            }
        }
        debug_assert_eq!(m, w, "count_missing counted the fresh keys");
    }

    /// Drops buckets with keys below `cut`; returns their keys.
    pub fn prune_before(&mut self, cut: u64) -> Vec<u64> {
        // Nearly always nothing is old enough: one look at the oldest bucket, not a binary
        // search through a map that is cold in the cache (every dirty node is pruned at every
        // checkpoint).
        if self.0.first().is_none_or(|(k, _)| *k >= cut) {
            return Vec::new();
        }
        let n = self.0.partition_point(|(k, _)| *k < cut);
        self.0.drain(..n).map(|(k, _)| k).collect()
    }
}

/// How many keys of `theirs` are not in `mine` (both sorted by key).
fn count_missing(mine: &[(u64, Agg)], theirs: &[(u64, Agg)]) -> usize {
    let (mut i, mut missing) = (0, 0);
    for (k, _) in theirs {
        while i < mine.len() && mine[i].0 < *k {
            i += 1;
        }
        if i == mine.len() || mine[i].0 != *k {
            missing += 1;
        }
    }
    missing
}

/// The three bucket granularities of docs/SPEC.md section 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub const ALL: [Granularity; 3] = [Granularity::Minute, Granularity::Hour, Granularity::Day];

    pub fn name(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.name() == s)
    }
}

/// Time buckets of one aggregate, per granularity, keyed by [`crate::time::BucketKey`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buckets(pub [BucketMap; 3]);

impl Buckets {
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|m| m.is_empty())
    }

    pub fn add_event(&mut self, keys: &[Option<u64>; 3], metrics: &[(MetricName, i64)]) {
        for (g, key) in keys.iter().enumerate() {
            if let Some(k) = key {
                if self.0[g].0.is_empty() {
                    self.0[g].0.reserve_exact(1);
                }
                self.0[g].entry(*k).add_event(metrics);
            }
        }
    }

    pub fn merge(&mut self, o: &Buckets) {
        for g in 0..3 {
            self.0[g].merge(&o.0[g]);
        }
    }

    pub fn get(&self, g: Granularity) -> &BucketMap {
        &self.0[g as usize]
    }

    /// Drops buckets whose key is older than `cutoff[g]` (keys compare in local-time order);
    /// returns the dropped keys per granularity.
    pub fn prune(&mut self, cutoff: &[u64; 3]) -> [Vec<u64>; 3] {
        let mut out: [Vec<u64>; 3] = Default::default();
        for g in 0..3 {
            if cutoff[g] > 0 {
                out[g] = self.0[g].prune_before(cutoff[g]);
            }
        }
        out
    }
}

/// A subtree delta: what a node passes up to its parent (totals plus buckets).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub total: Agg,
    pub buckets: Buckets,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.total.is_empty() && self.buckets.is_empty()
    }

    pub fn merge(&mut self, o: &Delta) {
        self.total.merge(&o.total);
        self.buckets.merge(&o.buckets);
    }
}

/// Where a metric lives inside a node's subtree: the totals, or one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    Total,
    Bucket(Granularity, u64),
}

impl Delta {
    /// The aggregate at `scope`, if any.
    pub fn at(&self, scope: Scope) -> Option<&Agg> {
        match scope {
            Scope::Total => Some(&self.total),
            Scope::Bucket(g, k) => self.buckets.0[g as usize].get(&k),
        }
    }

    /// Subtracts `o` (a subtree that leaves). Returns the (scope, metric) pairs whose extremes
    /// must be recomputed from the node's own numbers and its remaining children.
    pub fn subtract(&mut self, o: &Delta) -> Vec<(Scope, MetricName)> {
        let mut tainted: Vec<(Scope, MetricName)> = self
            .total
            .subtract(&o.total)
            .into_iter()
            .map(|m| (Scope::Total, m))
            .collect();
        for g in Granularity::ALL {
            let map = &mut self.buckets.0[g as usize];
            for (k, a) in o.buckets.0[g as usize].iter() {
                if let Some(mine) = map.get_mut(k) {
                    let t = mine.subtract(a);
                    if mine.events == 0 {
                        map.remove(k);
                    } else {
                        tainted.extend(t.into_iter().map(|m| (Scope::Bucket(g, *k), m)));
                    }
                }
            }
        }
        tainted
    }

    pub fn extremes(&self, scope: Scope, metric: &str) -> Option<(i64, i64)> {
        self.at(scope)
            .and_then(|a| a.stat(metric))
            .map(|s| (s.min, s.max))
    }

    pub fn set_extremes(&mut self, scope: Scope, metric: &str, mm: (i64, i64)) {
        let agg = match scope {
            Scope::Total => Some(&mut self.total),
            Scope::Bucket(g, k) => self.buckets.0[g as usize].get_mut(&k),
        };
        if let Some(a) = agg {
            a.set_extremes(metric, mm);
        }
    }
}

/// Combines two optional (min, max) pairs.
pub fn combine_extremes(a: Option<(i64, i64)>, b: Option<(i64, i64)>) -> Option<(i64, i64)> {
    match (a, b) {
        (Some(x), Some(y)) => Some((x.0.min(y.0), x.1.max(y.1))),
        (x, None) => x,
        (None, y) => y,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, v: i64) -> (MetricName, i64) {
        (MetricName::intern(name), v)
    }

    #[test]
    fn add_and_merge_keep_exact_sums_beyond_i64() {
        let mut a = Agg::default();
        a.add_event(&[m("big", i64::MAX)]);
        a.add_event(&[m("big", i64::MAX)]);
        let s = a.stat("big").unwrap();
        assert_eq!({ s.sum }, 2 * i64::MAX as i128);
        assert_eq!(s.count, 2);
        let json = serde_json::to_string(&AggJson(&a)).unwrap();
        assert!(json.contains("18446744073709551614"), "{json}");
    }

    #[test]
    fn stored_sums_are_integers_when_they_fit_and_rows_of_the_old_encoding_still_load() {
        let mut small = Agg::default();
        small.add_event(&[m("x", -5)]);
        let mut big = Agg::default();
        big.add_event(&[m("x", i64::MAX)]);
        big.add_event(&[m("x", i64::MAX)]);
        for a in [&small, &big] {
            let bytes = rmp_serde::to_vec(a).unwrap();
            assert_eq!(&rmp_serde::from_slice::<Agg>(&bytes).unwrap(), a);
        }
        // The compact form is smaller by the 16-byte i128 it no longer writes.
        #[derive(Serialize)]
        struct OldStat {
            count: u64,
            sum: i128,
            min: i64,
            max: i64,
        }
        let s = small.metrics[0].1;
        let old = rmp_serde::to_vec(&OldStat {
            count: s.count,
            sum: s.sum,
            min: s.min,
            max: s.max,
        })
        .unwrap();
        let new = rmp_serde::to_vec(&s).unwrap();
        assert!(
            new.len() + 16 <= old.len(),
            "{} vs {}",
            new.len(),
            old.len()
        );
        // A row written with the old encoding decodes to the same numbers.
        assert_eq!(rmp_serde::from_slice::<Stat>(&old).unwrap(), s);
        // JSON keeps the exact number, beyond 64 bits too.
        let json = serde_json::to_string(&big.metrics[0].1).unwrap();
        assert!(json.contains("18446744073709551614"), "{json}");
        assert_eq!(
            serde_json::from_str::<Stat>(&json).unwrap(),
            big.metrics[0].1
        );
    }

    #[test]
    fn two_metrics_fit_inside_an_aggregate() {
        // Stat packed to 8-byte alignment: 40 bytes, not 48.
        assert_eq!(std::mem::size_of::<Stat>(), 40);
        // A metric name is a thin pointer.
        assert_eq!(std::mem::size_of::<MetricName>(), 8);
        // events + two inline (name, stat) pairs + the small vector's length/capacity word.
        assert_eq!(std::mem::size_of::<Agg>(), 8 + 2 * (8 + 40) + 8);
        let mut a = Agg::default();
        a.add_event(&[m("amount", 5), m("items", 2)]);
        assert!(!a.metrics.spilled(), "two metrics stay inline");
        a.add_event(&[m("zeta", 1)]);
        assert!(a.metrics.spilled());
        assert_eq!(a.metrics.len(), 3);
    }

    #[test]
    fn bucket_merges_equal_one_insert_per_key_whatever_the_key_order() {
        use std::collections::BTreeMap;
        let map = |keys: &[u64], v: i64| {
            let mut b = BucketMap::default();
            for &k in keys {
                b.entry(k).add_event(&[m("x", v + k as i64)]);
            }
            b
        };
        // The key sets of both sides hit every path: empty, appended after, starting on the
        // newest key, interleaved with only known keys, interleaved with fresh ones.
        let cases: [(&[u64], &[u64]); 8] = [
            (&[], &[3, 5]),
            (&[3, 5], &[]),
            (&[1, 2], &[4, 9]),
            (&[1, 2], &[2, 7]),
            (&[1, 4, 9], &[4, 9]),
            (&[1, 4, 9], &[0, 4, 5, 9, 12]),
            (&[5], &[1, 2, 3]),
            (&[2, 4, 6, 8], &[1, 3, 5, 7, 9]),
        ];
        for (mine, theirs) in cases {
            let mut got = map(mine, 1);
            got.merge(&map(theirs, 100));
            let mut want: BTreeMap<u64, Agg> = BTreeMap::new();
            for (k, a) in map(mine, 1).iter().chain(map(theirs, 100).iter()) {
                want.entry(*k).or_default().merge(a);
            }
            let want: Vec<(u64, Agg)> = want.into_iter().collect();
            assert_eq!(got.0, want, "{mine:?} + {theirs:?}");
        }
    }

    proptest::proptest! {
        /// Random sorted key sets on both sides, merged in place, against a `BTreeMap`.
        #[test]
        fn bucket_merge_matches_a_sorted_map(
            mine in proptest::collection::btree_set(0u64..64, 0..24),
            theirs in proptest::collection::btree_set(0u64..64, 0..24),
        ) {
            use std::collections::BTreeMap;
            let map = |keys: &std::collections::BTreeSet<u64>, v: i64| {
                let mut b = BucketMap::default();
                for &k in keys {
                    b.entry(k).add_event(&[m("x", v + k as i64)]);
                }
                b
            };
            let (a, b) = (map(&mine, 1), map(&theirs, 100));
            let mut got = a.clone();
            got.merge(&b);
            let mut want: BTreeMap<u64, Agg> = BTreeMap::new();
            for (k, x) in a.iter().chain(b.iter()) {
                want.entry(*k).or_default().merge(x);
            }
            let want: Vec<(u64, Agg)> = want.into_iter().collect();
            proptest::prop_assert_eq!(got.0, want);
        }
    }

    #[test]
    fn subtract_taints_only_extremes_it_may_have_set() {
        let mut a = Agg::default();
        a.add_event(&[m("x", 1)]);
        a.add_event(&[m("x", 5)]);
        a.add_event(&[m("x", 9)]);
        let mut mid = Agg::default();
        mid.add_event(&[m("x", 5)]);
        assert!(a.subtract(&mid).is_empty(), "5 was neither min nor max");
        let mut top = Agg::default();
        top.add_event(&[m("x", 9)]);
        assert_eq!(a.subtract(&top).len(), 1);
        assert_eq!(a.events, 1);
        let mut rest = Agg::default();
        rest.add_event(&[m("x", 1)]);
        a.subtract(&rest);
        assert!(a.is_empty(), "metric with count 0 is absent: {a:?}");
    }
}
