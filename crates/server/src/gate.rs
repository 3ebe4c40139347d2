//! The interceptor in front of `Recommender`: the bearer-token check, and the arrival time that
//! request deadlines count from. The health and reflection services are not behind it, so a
//! load balancer can probe the server without a token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

/// When a request arrived (inserted into its extensions by [`Gate`]).
#[derive(Debug, Clone, Copy)]
pub struct Arrival(pub Instant);

/// Checks `authorization: Bearer <token>` when a token is configured, and stamps arrival times.
#[derive(Clone)]
pub struct Gate {
    token: Option<Arc<[u8]>>,
}

impl Gate {
    pub fn new(token: Option<String>) -> Gate {
        Gate {
            token: token.map(|t| Arc::from(format!("Bearer {t}").into_bytes())),
        }
    }
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.extensions_mut().insert(Arrival(Instant::now()));
        if let Some(expected) = &self.token {
            let given = req
                .metadata()
                .get("authorization")
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !constant_time_eq(given, expected) {
                return Err(Status::unauthenticated(
                    "missing or wrong bearer token (metadata `authorization: Bearer <token>`)",
                ));
            }
        }
        Ok(req)
    }
}

/// Compares without an early exit, so response time does not reveal how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &y) in b.iter().enumerate() {
        diff |= (a.get(i).copied().unwrap_or(0) ^ y) as usize;
    }
    diff == 0
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// When a request must be answered: the client's `grpc-timeout` (capped by the server's own
/// timeout), counted from arrival. tonic's transport also cancels a request at its
/// `grpc-timeout`; answering a little earlier lets the client see `DEADLINE_EXCEEDED` (and our
/// metrics count it) instead of a bare cancellation.
pub fn deadline(metadata: &MetadataMap, arrival: Option<Arrival>, default: Duration) -> Instant {
    let start = arrival.map(|a| a.0).unwrap_or_else(Instant::now);
    let client = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let budget = client.map_or(default, |c| c.min(default));
    let margin = (budget / 10).min(Duration::from_millis(2));
    start + budget - margin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1n"), Some(Duration::from_nanos(1)));
        for bad in ["", "S", "5", "123456789S", "5x", "-5S", "é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"Bearer a", b"Bearer a"));
        assert!(!constant_time_eq(b"Bearer ab", b"Bearer a"));
        assert!(!constant_time_eq(b"", b"Bearer a"));
    }
}
