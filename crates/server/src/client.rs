//! A client for `twotower recommend`, `twotower health` and `twotower bench serve`: a channel
//! with optional TLS (a CA file) and a bearer token on every call.

use std::path::PathBuf;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::error::{Error, Result};
use crate::proto::recommender_client::RecommenderClient;

/// Where and how to connect.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// `http://host:port`, or `https://host:port` with `ca`.
    pub url: String,
    /// Sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// PEM certificate of the CA that signed the server's certificate (for `https://`).
    pub ca: Option<PathBuf>,
    /// Deadline of each call (sent as `grpc-timeout`).
    pub timeout: Option<Duration>,
}

/// Adds the bearer token.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connected `Recommender` client.
pub type Client = RecommenderClient<InterceptedService<Channel, Bearer>>;

/// Opens a channel (connecting lazily is not enough: a wrong address should fail here).
pub async fn channel(opts: &ClientOptions) -> Result<Channel> {
    let bad = |e: tonic::transport::Error| Error::Transport(format!("{}: {e}", opts.url));
    let mut endpoint = Endpoint::from_shared(opts.url.clone())
        .map_err(|e| Error::Transport(format!("`{}` is not a URL: {e}", opts.url)))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(t) = opts.timeout {
        endpoint = endpoint.timeout(t);
    }
    if let Some(ca) = &opts.ca {
        let pem = std::fs::read(ca).map_err(|e| Error::io(ca, e))?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(bad)?;
    } else if opts.url.starts_with("https://") {
        return Err(Error::Transport(format!(
            "{}: https needs the CA certificate that signed the server's (--tls-ca)",
            opts.url
        )));
    }
    endpoint.connect().await.map_err(bad)
}

/// A `Recommender` client over `channel`.
pub fn recommender(channel: Channel, opts: &ClientOptions) -> Result<Client> {
    let token = match &opts.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| Error::setting("auth token", "must be printable ASCII"))?,
        ),
        None => None,
    };
    Ok(RecommenderClient::with_interceptor(channel, Bearer(token)))
}

/// Connects a `Recommender` client.
pub async fn connect(opts: &ClientOptions) -> Result<Client> {
    recommender(channel(opts).await?, opts)
}

/// Whether the server reports `twotower.v1.Recommender` as SERVING.
pub async fn is_serving(opts: &ClientOptions) -> Result<bool> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(opts).await?);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: crate::server::SERVICE_NAME.into(),
        })
        .await
        .map_err(|s| Error::Transport(format!("health check: {}", s.message())))?;
    Ok(reply.into_inner().status == ServingStatus::Serving as i32)
}

/// Reads a token file (the whole file, surrounding whitespace trimmed).
pub fn read_token(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(Error::BadFile {
            path: path.to_path_buf(),
            reason: "empty token file".into(),
        });
    }
    Ok(token)
}
