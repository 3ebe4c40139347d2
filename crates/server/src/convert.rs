//! Wire types to engine types: every request field is checked here, once, and a bad one becomes
//! `INVALID_ARGUMENT` naming the field (`events[3].type`, `filter.include_categories[0]`, ...).
//!
//! Conversions destructure every field, so a field added to the proto breaks the build until
//! someone decides what it means.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use features::{Event, EventType};
use tonic::Status;

use crate::catalog::ItemCatalog;
use crate::config::{MAX_INLINE_EVENTS, MAX_K};
use crate::filter::RowFilter;
use crate::proto;
use crate::seen::SeenItems;

/// Latest accepted timestamp: 3000-01-01 UTC, in ms. Anything later is a unit mistake (µs, ns).
pub const MAX_TS_MS: i64 = 32_503_680_000_000;
/// Longest accepted search query, in bytes.
pub const MAX_QUERY_BYTES: usize = 1024;
/// Most user features in a request's context.
pub const MAX_USER_FEATURES: usize = 64;
/// Longest accepted user feature or category name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// The current time in ms since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Checks one wire event and turns it into a stored event of `user_id`.
pub fn event(field: &str, user_id: u64, e: &proto::Event) -> Result<Event, Status> {
    let proto::Event {
        r#type,
        item_id,
        query,
        ts_ms,
        value,
    } = e;
    let event_type = usize::try_from(*r#type)
        .ok()
        .and_then(|code| code.checked_sub(1))
        .and_then(|i| EventType::ALL.get(i).copied())
        .ok_or_else(|| {
            invalid(
                &format!("{field}.type"),
                format!("unknown event type {}", r#type),
            )
        })?;
    if !(0..=MAX_TS_MS).contains(ts_ms) {
        return Err(invalid(
            &format!("{field}.ts_ms"),
            format!("{ts_ms} is outside [0, {MAX_TS_MS}] (milliseconds since the Unix epoch)"),
        ));
    }
    if let Some(v) = value {
        if !v.is_finite() {
            return Err(invalid(
                &format!("{field}.value"),
                format!("{v} is not a finite number"),
            ));
        }
    }
    if let Some(q) = query {
        if q.len() > MAX_QUERY_BYTES {
            return Err(invalid(
                &format!("{field}.query"),
                format!("{} bytes, at most {MAX_QUERY_BYTES}", q.len()),
            ));
        }
    }
    let event = Event {
        user_id,
        ts_ms: *ts_ms,
        event_type,
        item_id: *item_id,
        query: if event_type == EventType::Search {
            query.clone()
        } else {
            None
        },
        value: *value,
    };
    if event_type != EventType::Search && query.is_some() {
        return Err(invalid(
            &format!("{field}.query"),
            format!("only search events carry a query, not `{event_type}`"),
        ));
    }
    features::table::validate_event(&event)
        .map_err(|(column, reason)| invalid(&format!("{field}.{column}"), reason))?;
    Ok(event)
}

/// `k` of `Recommend` or `SimilarItems`.
pub fn k(k: u32) -> Result<usize, Status> {
    if k == 0 || k > MAX_K {
        return Err(invalid("k", format!("{k} is outside 1..={MAX_K}")));
    }
    Ok(k as usize)
}

/// A wire filter before it meets a catalog.
#[derive(Debug, Clone, Default)]
pub struct FilterSpec {
    pub include_categories: Vec<String>,
    pub exclude_categories: Vec<String>,
    pub exclude_item_ids: Vec<u64>,
    pub exclude_seen: bool,
}

impl FilterSpec {
    pub fn from_proto(f: Option<&proto::Filter>) -> FilterSpec {
        let Some(proto::Filter {
            include_categories,
            exclude_categories,
            exclude_item_ids,
            exclude_seen,
        }) = f
        else {
            return FilterSpec {
                exclude_seen: true,
                ..Default::default()
            };
        };
        FilterSpec {
            include_categories: include_categories.clone(),
            exclude_categories: exclude_categories.clone(),
            exclude_item_ids: exclude_item_ids.clone(),
            exclude_seen: exclude_seen.unwrap_or(true),
        }
    }

    /// Resolves category names against this version's catalog. An unknown category is an error:
    /// it usually is a typo, and silently matching nothing would hide it.
    /// `seen` (the stored seen items) and `inline_seen` (the request's inline events' items)
    /// are dropped when `exclude_seen` is on.
    pub fn resolve(
        &self,
        catalog: &ItemCatalog,
        seen: Arc<SeenItems>,
        inline_seen: impl IntoIterator<Item = u64>,
    ) -> Result<RowFilter, Status> {
        let ids = |names: &[String], field: &str| -> Result<Vec<u32>, Status> {
            let mut out = Vec::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                let f = format!("filter.{field}[{i}]");
                if name.len() > MAX_NAME_BYTES {
                    return Err(invalid(&f, format!("longer than {MAX_NAME_BYTES} bytes")));
                }
                out.push(
                    catalog
                        .category_id(name)
                        .ok_or_else(|| invalid(&f, format!("unknown category `{name}`")))?,
                );
            }
            out.sort_unstable();
            out.dedup();
            Ok(out)
        };
        let mut filter = RowFilter {
            include: ids(&self.include_categories, "include_categories")?,
            exclude: ids(&self.exclude_categories, "exclude_categories")?,
            exclude_ids: self.exclude_item_ids.iter().copied().collect(),
            seen: Arc::default(),
        };
        if self.exclude_seen {
            filter.seen = seen;
            filter.exclude_ids.extend(inline_seen);
        }
        Ok(filter)
    }
}

/// A checked `Recommend` request.
#[derive(Debug, Clone)]
pub struct RecommendQuery {
    pub user_id: Option<u64>,
    /// Inline events, in request order.
    pub events: Vec<Event>,
    /// The request time (`context.ts_ms`, or now).
    pub ts_ms: i64,
    /// Whether the client set the time (then events at or after it are not history).
    pub explicit_time: bool,
    pub user_features: Vec<String>,
    pub k: usize,
    pub filter: FilterSpec,
    pub nprobe: Option<usize>,
}

impl TryFrom<&proto::RecommendRequest> for RecommendQuery {
    type Error = Status;

    fn try_from(r: &proto::RecommendRequest) -> Result<Self, Status> {
        let proto::RecommendRequest {
            user_id,
            events,
            context,
            k: wire_k,
            filter,
            nprobe,
        } = r;
        let k = k(*wire_k)?;
        if events.len() > MAX_INLINE_EVENTS {
            return Err(invalid(
                "events",
                format!(
                    "{} inline events, at most {MAX_INLINE_EVENTS}",
                    events.len()
                ),
            ));
        }
        let uid = user_id.unwrap_or(0);
        let events = events
            .iter()
            .enumerate()
            .map(|(i, e)| event(&format!("events[{i}]"), uid, e))
            .collect::<Result<Vec<_>, _>>()?;
        let (ts, features) = match context {
            Some(proto::Context {
                ts_ms,
                user_features,
            }) => (*ts_ms, user_features.clone()),
            None => (0, Vec::new()),
        };
        if !(0..=MAX_TS_MS).contains(&ts) {
            return Err(invalid(
                "context.ts_ms",
                format!("{ts} is outside [0, {MAX_TS_MS}] (0 means now)"),
            ));
        }
        if features.len() > MAX_USER_FEATURES {
            return Err(invalid(
                "context.user_features",
                format!("{} features, at most {MAX_USER_FEATURES}", features.len()),
            ));
        }
        if let Some(i) = features.iter().position(|f| f.len() > MAX_NAME_BYTES) {
            return Err(invalid(
                &format!("context.user_features[{i}]"),
                format!("longer than {MAX_NAME_BYTES} bytes"),
            ));
        }
        let nprobe = match nprobe {
            Some(0) => return Err(invalid("nprobe", "must be at least 1")),
            Some(n) => Some(*n as usize),
            None => None,
        };
        Ok(RecommendQuery {
            user_id: *user_id,
            events,
            ts_ms: if ts == 0 { now_ms() } else { ts },
            explicit_time: ts != 0,
            user_features: features,
            k,
            filter: FilterSpec::from_proto(filter.as_ref()),
            nprobe,
        })
    }
}

/// A checked `RecordEvents` request, flattened into events.
#[derive(Debug)]
pub struct RecordBatch {
    pub events: Vec<Event>,
    /// The idempotency key; `None` when the request left it empty.
    pub key: Option<String>,
}

/// The events of a `RecordEvents` request: at most `max`, none later than `latest_ms` (the
/// server's clock plus the allowed skew), and its idempotency key.
pub fn record_events(
    r: &proto::RecordEventsRequest,
    max: usize,
    latest_ms: i64,
) -> Result<RecordBatch, Status> {
    let proto::RecordEventsRequest {
        users,
        idempotency_key,
    } = r;
    if idempotency_key.len() > crate::dedup::MAX_KEY_BYTES {
        return Err(invalid(
            "idempotency_key",
            format!(
                "{} bytes, at most {}",
                idempotency_key.len(),
                crate::dedup::MAX_KEY_BYTES
            ),
        ));
    }
    let total: usize = users.iter().map(|u| u.events.len()).sum();
    if total > max {
        return Err(invalid(
            "users",
            format!("{total} events, at most {max} per request"),
        ));
    }
    let mut out = Vec::with_capacity(total);
    for (i, u) in users.iter().enumerate() {
        let proto::UserEvents { user_id, events } = u;
        for (j, e) in events.iter().enumerate() {
            let field = format!("users[{i}].events[{j}]");
            if e.ts_ms == 0 {
                // A recorded event keeps its time for good; 1970 is no one's, and stored it would
                // sit at the start of the history, out of every window.
                return Err(invalid(
                    &format!("{field}.ts_ms"),
                    "missing (0 is the unset value): send the event's time in milliseconds since the Unix epoch",
                ));
            }
            if e.ts_ms > latest_ms {
                return Err(invalid(
                    &format!("{field}.ts_ms"),
                    format!(
                        "{} is {} s ahead of the server's clock, more than the allowed skew (max_clock_skew_ms); send times in milliseconds since the Unix epoch",
                        e.ts_ms,
                        (e.ts_ms - now_ms()) / 1000
                    ),
                ));
            }
            out.push(event(&field, *user_id, e)?);
        }
    }
    Ok(RecordBatch {
        events: out,
        key: (!idempotency_key.is_empty()).then(|| idempotency_key.clone()),
    })
}

/// A scored item on the wire.
pub fn scored_item(catalog: &ItemCatalog, row: u32, id: u64, score: f32) -> proto::ScoredItem {
    proto::ScoredItem {
        item_id: id,
        score,
        title: catalog.title(row).to_string(),
        categories: catalog.category_names_of(row),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: i32, item: Option<u64>, query: Option<&str>, ts: i64) -> proto::Event {
        proto::Event {
            r#type: t,
            item_id: item,
            query: query.map(str::to_string),
            ts_ms: ts,
            value: None,
        }
    }

    #[test]
    fn an_event_an_hour_ahead_of_the_server_clock_is_refused_naming_the_field() {
        let now = now_ms();
        let latest = now + 3_600_000;
        let req = |ts: i64| proto::RecordEventsRequest {
            users: vec![proto::UserEvents {
                user_id: 7,
                events: vec![ev(1, Some(1), None, now), ev(5, Some(2), None, ts)],
            }],
            idempotency_key: String::new(),
        };
        let ok = record_events(&req(now + 60_000), 10, latest).unwrap();
        assert_eq!((ok.events.len(), ok.key), (2, None));
        let err = record_events(&req(now + 2 * 3_600_000), 10, latest).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with("users[0].events[1].ts_ms:")
                && err.message().contains("ahead of the server's clock"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn a_recorded_event_without_a_time_is_refused_not_stored_in_1970() {
        let req = proto::RecordEventsRequest {
            users: vec![proto::UserEvents {
                user_id: 7,
                events: vec![ev(5, Some(2), None, 0)],
            }],
            idempotency_key: String::new(),
        };
        let err = record_events(&req, 10, now_ms()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message()
                .starts_with("users[0].events[0].ts_ms: missing"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn bad_events_name_their_field() {
        let cases = [
            (ev(0, Some(1), None, 5), "e.type"),
            (ev(99, Some(1), None, 5), "e.type"),
            (ev(-3, Some(1), None, 5), "e.type"),
            (ev(1, Some(1), None, -1), "e.ts_ms"),
            (ev(1, Some(1), None, i64::MAX), "e.ts_ms"),
            (ev(1, None, None, 5), "e.item_id"),
            (ev(2, None, Some("  "), 5), "e.query"),
            (ev(2, Some(3), Some("shoes"), 5), "e.item_id"),
            (ev(1, Some(3), Some("shoes"), 5), "e.query"),
        ];
        for (e, field) in cases {
            let err = event("e", 1, &e).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with(field), "{e:?}: {}", err.message());
        }
        let mut nan = ev(6, Some(1), None, 5);
        nan.value = Some(f32::NAN);
        assert!(event("e", 1, &nan)
            .unwrap_err()
            .message()
            .starts_with("e.value"));
        let ok = event("e", 9, &ev(2, None, Some("red shoes"), 5)).unwrap();
        assert_eq!((ok.user_id, ok.event_type), (9, EventType::Search));
    }

    #[test]
    fn recommend_limits() {
        let req = |k: u32, n: usize| proto::RecommendRequest {
            k,
            events: vec![ev(1, Some(1), None, 5); n],
            ..Default::default()
        };
        assert!(RecommendQuery::try_from(&req(0, 0))
            .unwrap_err()
            .message()
            .starts_with("k:"));
        assert!(RecommendQuery::try_from(&req(1001, 0))
            .unwrap_err()
            .message()
            .starts_with("k:"));
        let too_many = RecommendQuery::try_from(&req(5, MAX_INLINE_EVENTS + 1)).unwrap_err();
        assert!(too_many.message().starts_with("events:"));
        let q = RecommendQuery::try_from(&req(1000, MAX_INLINE_EVENTS)).unwrap();
        assert!(q.filter.exclude_seen && !q.explicit_time);
        let mut r = req(5, 0);
        r.context = Some(proto::Context {
            ts_ms: -5,
            user_features: vec![],
        });
        assert!(RecommendQuery::try_from(&r)
            .unwrap_err()
            .message()
            .starts_with("context.ts_ms"));
    }
}
