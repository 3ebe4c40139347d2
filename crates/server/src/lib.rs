//! # server: the gRPC recommendation service
//!
//! Serves `twotower.v1.Recommender`: runs the user tower online over a user's stored and inline
//! history, retrieves top-k items from the FAISS index with exact filters, records new events
//! durably, and hot-reloads new index and model versions. Also serves `grpc.health.v1` and
//! server reflection.
//!
//! Data flow: features → towers → indexer → **server** → gRPC clients.

pub mod admission;
pub mod admit;
pub mod bench;
pub mod bus;
pub mod catalog;
pub mod client;
pub mod commit;
pub mod compact;
pub mod config;
pub mod connections;
pub mod convert;
pub mod dedup;
pub mod encoder;
pub mod error;
pub mod eventlog;
pub mod filter;
pub mod gate;
pub mod history;
pub mod logrecord;
pub mod metrics;
pub mod priority;
pub mod proto;
pub mod recorder;
pub mod reload;
pub mod retrieve;
pub mod seed;
pub mod seen;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod userinput;
pub mod userlimit;

pub use bus::BusSettings;
pub use config::ServeConfig;
pub use error::{Error, Result};
pub use recorder::EventStore;
pub use server::{shutdown_signal, start, Running, ServeOptions, TlsFiles, SERVICE_NAME};

#[cfg(test)]
mod tests {
    //! Smoke test: proves tonic serves and answers a real `grpc.health.v1` check over loopback.
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    #[tokio::test]
    async fn health_check_over_loopback() {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(
                "twotower.v1.Recommender",
                tonic_health::ServingStatus::Serving,
            )
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        stopped.await.ok();
                    },
                ),
        );

        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let status = |service: &str| HealthCheckRequest {
            service: service.to_string(),
        };
        let reply = client
            .check(status("twotower.v1.Recommender"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32);
        let unknown = client.check(status("no.such.Service")).await.unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
