//! The `/v1` read endpoints of docs/SPEC.md §10. Every handler answers from one store read, so the
//! numbers of one answer come from one checkpoint (`as_of`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use canopy_actors::agg::{Agg, AggJson, Granularity, Stat};
use canopy_actors::time::{parse_rfc3339, BucketKey, Micros};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use super::auth::Access;
use super::error::ApiError;
use super::extract::{PathParams, QueryParams};
use super::ApiState;

/// Most children or roots one answer lists.
pub const MAX_LIMIT: u32 = 1000;
pub const DEFAULT_LIMIT: u32 = 100;
/// Most buckets one series answer lists: the newest of the range, with `truncated` set when
/// there were more. Stored buckets are bounded by retention (2,880 minutes, 840 hours, 400
/// days by default), so the cap only bites with a longer configured retention; the range
/// asked for is never refused for its width (issue 24).
pub const MAX_SERIES_BUCKETS: usize = 10_000;

type St = State<Arc<ApiState>>;
type Answer<T> = Result<Json<T>, ApiError>;

/// One metric's statistics over the events that carried it.
#[derive(Serialize, ToSchema)]
pub struct StatDoc {
    pub count: u64,
    /// Up to 128 bits: sums of 64-bit values do not overflow.
    pub sum: i128,
    pub min: i64,
    pub max: i64,
}

/// An aggregate (docs/SPEC.md §4): events, and per metric count/sum/min/max. Identical to the dump's.
#[derive(Serialize, ToSchema)]
pub struct AggDoc {
    pub events: u64,
    pub metrics: HashMap<String, StatDoc>,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// Every error: 400 bad parameters, 401 missing or unknown token, 404 not found (or not
/// readable with this token), 503 store unavailable or too many connections; and from the
/// HTTP layer 400, 405, 408, 413, 414, 431, in the same shape.
#[derive(Serialize, ToSchema)]
pub struct ErrorAnswer {
    pub error: ErrorBody,
}

/// Raw JSON, because sums are 128-bit and `serde_json::Value` holds at most 64-bit integers.
type Raw = Box<RawValue>;

fn agg(a: &Agg) -> Raw {
    RawValue::from_string(serde_json::to_string(&AggJson(a)).expect("an aggregate serializes"))
        .expect("serde_json output is JSON")
}

fn metrics_of(a: &Agg) -> Raw {
    struct M<'a>(&'a Agg);
    impl Serialize for M<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.metrics.iter().map(|(n, st)| (&**n, st)))
        }
    }
    RawValue::from_string(serde_json::to_string(&M(a)).expect("metrics serialize"))
        .expect("serde_json output is JSON")
}

#[derive(Serialize, ToSchema)]
pub struct TenantsAnswer {
    pub tenants: Vec<String>,
    pub as_of: u64,
}

#[utoipa::path(get, path = "/v1/tenants", security(("bearer" = [])),
    responses((status = 200, body = TenantsAnswer), (status = 401, body = ErrorAnswer)))]
pub async fn tenants(State(st): St, access: Access) -> Answer<TenantsAnswer> {
    let r = st.store.tenant_ids().await?;
    let mut tenants: Vec<String> = r.value.into_iter().filter(|t| access.may_read(t)).collect();
    tenants.sort();
    Ok(Json(TenantsAnswer {
        tenants,
        as_of: r.as_of,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct HierarchyItem {
    pub hierarchy: String,
    /// `current` or `attributed`.
    pub mode: String,
    pub nodes: u64,
}

#[derive(Serialize, ToSchema)]
pub struct HierarchiesAnswer {
    pub hierarchies: Vec<HierarchyItem>,
    pub as_of: u64,
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/hierarchies", security(("bearer" = [])),
    params(("tenant" = String, Path)),
    responses((status = 200, body = HierarchiesAnswer), (status = 401, body = ErrorAnswer),
        (status = 404, body = ErrorAnswer)))]
pub async fn hierarchies(
    State(st): St,
    access: Access,
    PathParams(tenant): PathParams<String>,
) -> Answer<HierarchiesAnswer> {
    let what = format!("tenant {tenant}");
    access.check(&tenant, &what)?;
    let r = st.store.hierarchies(&tenant).await?;
    let list = r.value.ok_or_else(|| ApiError::not_found(&what))?;
    Ok(Json(HierarchiesAnswer {
        hierarchies: list
            .into_iter()
            .map(|h| HierarchyItem {
                hierarchy: h.hierarchy,
                mode: h.mode.name().to_string(),
                nodes: h.nodes,
            })
            .collect(),
        as_of: r.as_of,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct NodeAnswer {
    pub tenant: String,
    pub hierarchy: String,
    pub node: String,
    pub parent: Option<String>,
    pub children: Vec<String>,
    #[schema(value_type = AggDoc)]
    pub own: Raw,
    #[schema(value_type = AggDoc)]
    pub subtree: Raw,
    pub as_of: u64,
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/hierarchies/{hierarchy}/nodes/{node}",
    security(("bearer" = [])),
    params(("tenant" = String, Path), ("hierarchy" = String, Path), ("node" = String, Path)),
    responses((status = 200, body = NodeAnswer), (status = 401, body = ErrorAnswer),
        (status = 404, body = ErrorAnswer)))]
pub async fn node(
    State(st): St,
    access: Access,
    PathParams((tenant, hierarchy, node)): PathParams<(String, String, String)>,
) -> Answer<NodeAnswer> {
    let what = format!("node {tenant}/{hierarchy}/{node}");
    access.check(&tenant, &what)?;
    let r = st.store.node(&tenant, &hierarchy, &node).await?;
    let v = r.value.ok_or_else(|| ApiError::not_found(&what))?;
    Ok(Json(NodeAnswer {
        own: agg(&v.header.own),
        subtree: agg(&v.header.subtree),
        tenant,
        hierarchy,
        node,
        parent: v.parent,
        children: v.children,
        as_of: r.as_of,
    }))
}

#[derive(Deserialize, Clone, Copy, ToSchema, Default, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum By {
    #[default]
    Sum,
    Count,
    Min,
    Max,
}

#[derive(Deserialize, Clone, Copy, ToSchema, Default, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    #[default]
    Desc,
    Asc,
}

/// How to rank children (or roots): by `events` (the default) or by a metric's statistic.
#[derive(Deserialize, IntoParams, Debug, Default)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RankQuery {
    /// `events`, or a metric name.
    pub sort: Option<String>,
    /// The statistic of `sort` when it is a metric (default `sum`).
    #[param(inline)]
    pub by: Option<By>,
    #[param(inline)]
    pub order: Option<Order>,
    /// 1..=1000, default 100; anything else answers `bad_limit`.
    // Text, so that `-1` or `x` answer `bad_limit` rather than a generic `bad_query`.
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
    /// `true`: each item also says how many children it has (the dashboard draws no expand
    /// arrow on a leaf). Read per item after the ranking, so at most `limit` more reads.
    pub count_children: Option<bool>,
}

#[derive(Serialize, ToSchema)]
pub struct RankedItem {
    pub node: String,
    #[schema(value_type = AggDoc)]
    pub subtree: Raw,
    /// With `count_children=true`: the node's children, from the checkpoint current when it
    /// was read (the same as `as_of`, or a newer one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub children: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct ItemsAnswer {
    pub items: Vec<RankedItem>,
    pub as_of: u64,
}

fn stat_of<'a>(a: &'a Agg, metric: &str) -> Option<&'a Stat> {
    a.metrics
        .iter()
        .find(|(n, _)| &**n == metric)
        .map(|(_, s)| s)
}

/// Ranks `items` in place and keeps the first `limit`. Items without the metric come last; ties
/// go by node id so that pages are stable.
pub fn rank(items: &mut Vec<(String, Agg)>, q: &RankQuery) -> Result<(), ApiError> {
    let limit = match q.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "bad_limit",
                    format!("`limit` must be an integer from 1 to {MAX_LIMIT}, not {l:?}"),
                )
            })?,
    };
    let sort = q.sort.as_deref().unwrap_or("events");
    let by = q.by.unwrap_or_default();
    if sort != "events"
        && !items.is_empty()
        && !items.iter().any(|(_, a)| stat_of(a, sort).is_some())
    {
        return Err(ApiError::bad_request(
            "unknown_metric",
            format!("no item here has the metric `{sort}` (sort by `events` or a metric name)"),
        ));
    }
    let key = |a: &Agg| -> Option<i128> {
        if sort == "events" {
            return Some(a.events as i128);
        }
        stat_of(a, sort).map(|s| match by {
            By::Sum => s.sum,
            By::Count => s.count as i128,
            By::Min => s.min as i128,
            By::Max => s.max as i128,
        })
    };
    let desc = q.order.unwrap_or_default() == Order::Desc;
    items.sort_by(|(na, a), (nb, b)| {
        let (ka, kb) = (key(a), key(b));
        let by_value = match (ka, kb) {
            (Some(x), Some(y)) if desc => y.cmp(&x),
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        by_value.then_with(|| na.cmp(nb))
    });
    items.truncate(limit as usize);
    Ok(())
}

async fn items(
    st: &ApiState,
    (tenant, hierarchy): (&str, &str),
    list: Vec<(String, Agg)>,
    as_of: u64,
    q: &RankQuery,
) -> Result<ItemsAnswer, ApiError> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let counts: Vec<Option<u64>> = if q.count_children == Some(true) {
        // Owned per item: a stream of futures borrowing the list does not satisfy the
        // handler's `Send` bound (higher-ranked lifetimes).
        let reads = list.iter().map(|(node, _)| {
            let (store, t, h, n) = (
                st.store.clone(),
                tenant.to_string(),
                hierarchy.to_string(),
                node.clone(),
            );
            async move { store.node(&t, &h, &n).await }
        });
        futures::stream::iter(reads.collect::<Vec<_>>())
            .buffered(16)
            .map(|r| {
                let r = r?;
                // A node deleted since the list was read has none.
                Ok::<_, ApiError>(Some(r.value.map_or(0, |v| v.children.len() as u64)))
            })
            .try_collect()
            .await?
    } else {
        vec![None; list.len()]
    };
    Ok(ItemsAnswer {
        items: list
            .into_iter()
            .zip(counts)
            .map(|((node, a), children)| RankedItem {
                subtree: agg(&a),
                node,
                children,
            })
            .collect(),
        as_of,
    })
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/hierarchies/{hierarchy}/roots",
    security(("bearer" = [])),
    params(("tenant" = String, Path), ("hierarchy" = String, Path), RankQuery),
    responses((status = 200, body = ItemsAnswer), (status = 400, body = ErrorAnswer),
        (status = 401, body = ErrorAnswer), (status = 404, body = ErrorAnswer)))]
pub async fn roots(
    State(st): St,
    access: Access,
    PathParams((tenant, hierarchy)): PathParams<(String, String)>,
    QueryParams(q): QueryParams<RankQuery>,
) -> Answer<ItemsAnswer> {
    let what = format!("hierarchy {tenant}/{hierarchy}");
    access.check(&tenant, &what)?;
    let r = st.store.children(&tenant, &hierarchy, None).await?;
    let mut list = r.value.ok_or_else(|| ApiError::not_found(&what))?;
    rank(&mut list, &q)?;
    Ok(Json(
        items(&st, (&tenant, &hierarchy), list, r.as_of, &q).await?,
    ))
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/hierarchies/{hierarchy}/nodes/{node}/children",
    security(("bearer" = [])),
    params(("tenant" = String, Path), ("hierarchy" = String, Path), ("node" = String, Path),
        RankQuery),
    responses((status = 200, body = ItemsAnswer), (status = 400, body = ErrorAnswer),
        (status = 401, body = ErrorAnswer), (status = 404, body = ErrorAnswer)))]
pub async fn children(
    State(st): St,
    access: Access,
    PathParams((tenant, hierarchy, node)): PathParams<(String, String, String)>,
    QueryParams(q): QueryParams<RankQuery>,
) -> Answer<ItemsAnswer> {
    let what = format!("node {tenant}/{hierarchy}/{node}");
    access.check(&tenant, &what)?;
    let r = st.store.children(&tenant, &hierarchy, Some(&node)).await?;
    let mut list = r.value.ok_or_else(|| ApiError::not_found(&what))?;
    rank(&mut list, &q)?;
    Ok(Json(
        items(&st, (&tenant, &hierarchy), list, r.as_of, &q).await?,
    ))
}

/// A time range of one granularity: buckets with `from` ≤ start < `to` (both optional).
#[derive(Deserialize, IntoParams, Debug)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SeriesQuery {
    /// `minute`, `hour` or `day`.
    pub granularity: String,
    /// RFC 3339, inclusive.
    pub from: Option<String>,
    /// RFC 3339, exclusive.
    pub to: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SeriesBucket {
    /// The bucket's local start with its offset, as in the dump.
    pub start: String,
    pub events: u64,
    #[schema(value_type = HashMap<String, StatDoc>)]
    pub metrics: Raw,
}

#[derive(Serialize, ToSchema)]
pub struct SeriesAnswer {
    pub granularity: String,
    pub buckets: Vec<SeriesBucket>,
    /// True when the range held more than 10,000 buckets: `buckets` are the newest 10,000.
    pub truncated: bool,
    pub as_of: u64,
}

fn instant(field: &str, v: Option<&str>) -> Result<Option<Micros>, ApiError> {
    v.map(|s| {
        parse_rfc3339(s).ok_or_else(|| {
            ApiError::bad_request(
                "bad_time",
                format!("`{field}` is not an RFC 3339 time (e.g. 2026-11-21T00:00:00Z): {s:?}"),
            )
        })
    })
    .transpose()
}

/// Validates a series request: the granularity and the range.
pub fn series_range(q: &SeriesQuery) -> Result<(Granularity, Micros, Micros), ApiError> {
    let g = Granularity::parse(&q.granularity).ok_or_else(|| {
        ApiError::bad_request(
            "bad_granularity",
            format!(
                "`granularity` must be minute, hour or day, not {:?}",
                q.granularity
            ),
        )
    })?;
    let from = instant("from", q.from.as_deref())?;
    let to = instant("to", q.to.as_deref())?;
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            return Err(ApiError::bad_request("bad_range", "`from` is after `to`"));
        }
    }
    Ok((g, from.unwrap_or(Micros::MIN), to.unwrap_or(Micros::MAX)))
}

/// The last `cap` of `rows` (sorted oldest first), and whether any were left out.
fn newest<T>(mut rows: Vec<T>, cap: usize) -> (Vec<T>, bool) {
    let older = rows.len().saturating_sub(cap);
    rows.drain(..older);
    (rows, older > 0)
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/hierarchies/{hierarchy}/nodes/{node}/series",
    security(("bearer" = [])),
    params(("tenant" = String, Path), ("hierarchy" = String, Path), ("node" = String, Path),
        SeriesQuery),
    responses((status = 200, body = SeriesAnswer), (status = 400, body = ErrorAnswer),
        (status = 401, body = ErrorAnswer), (status = 404, body = ErrorAnswer)))]
pub async fn series(
    State(st): St,
    access: Access,
    PathParams((tenant, hierarchy, node)): PathParams<(String, String, String)>,
    QueryParams(q): QueryParams<SeriesQuery>,
) -> Answer<SeriesAnswer> {
    let what = format!("node {tenant}/{hierarchy}/{node}");
    access.check(&tenant, &what)?;
    let (g, from, to) = series_range(&q)?;
    let r = st.store.series(&tenant, &hierarchy, &node, g).await?;
    let rows = r.value.ok_or_else(|| ApiError::not_found(&what))?;
    // Keys sort by local time; across a fall-back the repeated hour's two keys are in the
    // opposite order of their instants, so order by instant.
    let mut rows: Vec<(i64, u64, Agg)> = rows
        .into_iter()
        .map(|(k, a)| (BucketKey(k).instant_secs(), k, a))
        .filter(|(s, _, _)| {
            let us = s.saturating_mul(1_000_000);
            from <= us && us < to
        })
        .collect();
    rows.sort_by_key(|(s, _, _)| *s);
    let (rows, truncated) = newest(rows, MAX_SERIES_BUCKETS);
    let buckets = rows
        .into_iter()
        .map(|(_, k, a)| SeriesBucket {
            start: BucketKey(k).format(),
            events: a.events,
            metrics: metrics_of(&a),
        })
        .collect();
    Ok(Json(SeriesAnswer {
        granularity: g.name().to_string(),
        buckets,
        truncated,
        as_of: r.as_of,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct EntityAnswer {
    pub entity: String,
    pub suspended: bool,
    /// hierarchy → parent (null for a root), for each hierarchy the entity is a node of.
    pub hierarchies: BTreeMap<String, Option<String>>,
    pub as_of: u64,
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/entities/{entity}", security(("bearer" = [])),
    params(("tenant" = String, Path), ("entity" = String, Path)),
    responses((status = 200, body = EntityAnswer), (status = 401, body = ErrorAnswer),
        (status = 404, body = ErrorAnswer)))]
pub async fn entity(
    State(st): St,
    access: Access,
    PathParams((tenant, entity)): PathParams<(String, String)>,
) -> Answer<EntityAnswer> {
    let what = format!("entity {tenant}/{entity}");
    access.check(&tenant, &what)?;
    let r = st.store.entity(&tenant, &entity).await?;
    let v = r.value.ok_or_else(|| ApiError::not_found(&what))?;
    Ok(Json(EntityAnswer {
        entity,
        suspended: v.suspended,
        hierarchies: v.hierarchies.into_iter().collect(),
        as_of: r.as_of,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_keeps_its_newest_buckets_and_says_so() {
        assert_eq!(newest(vec![1, 2, 3], 5), (vec![1, 2, 3], false));
        assert_eq!(newest(vec![1, 2, 3], 3), (vec![1, 2, 3], false));
        assert_eq!(newest(vec![1, 2, 3, 4, 5], 2), (vec![4, 5], true));
    }

    #[test]
    fn any_range_width_is_a_valid_question() {
        let q = |from: &str, to: &str| SeriesQuery {
            granularity: "minute".into(),
            from: Some(from.into()),
            to: Some(to.into()),
        };
        assert!(series_range(&q("1970-01-01T00:00:00Z", "2199-01-01T00:00:00Z")).is_ok());
        let e = series_range(&q("2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z")).unwrap_err();
        assert_eq!(e.code, "bad_range");
    }

    #[test]
    fn any_bad_limit_is_bad_limit() {
        for l in ["-1", "0", "1001", "x", "", "1e3", "99999999999999999999"] {
            let q = RankQuery {
                limit: Some(l.into()),
                ..Default::default()
            };
            assert_eq!(
                rank(&mut Vec::new(), &q).unwrap_err().code,
                "bad_limit",
                "{l:?}"
            );
        }
        let q = RankQuery {
            limit: Some(" 7 ".into()),
            ..Default::default()
        };
        assert!(rank(&mut Vec::new(), &q).is_ok());
    }
}
