//! Health, reflection, the bearer token, TLS, and the status of every kind of bad request.

use std::time::Duration;

use server::proto::{
    Context, Event, Filter, GetModelInfoRequest, RecommendRequest, RecommendResponse,
    RecordEventsRequest, SimilarItemsRequest, UserEvents,
};
use tonic::codegen::http;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::fixture::{fixture, options, start, start_with, view};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    let s = start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.running.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for name in [server::SERVICE_NAME, ""] {
        let r = health
            .check(HealthCheckRequest {
                service: name.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{name:?}");
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(vec![
            request(MessageRequest::ListServices(String::new())),
            request(MessageRequest::FileContainingSymbol(
                "twotower.v1.RecommendRequest".into(),
            )),
        ]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&server::SERVICE_NAME.to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("no file descriptor")
    };
    assert!(!files.file_descriptor_proto.is_empty());
    s.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_guards_recommender_but_not_health() {
    let state = tempfile::tempdir().unwrap();
    let mut opts = options(state.path());
    opts.auth_token = Some("s3cret-token".into());
    let mut s = start_with(opts, state).await;
    let with = |token: Option<&str>| {
        let mut r = tonic::Request::new(GetModelInfoRequest {});
        if let Some(t) = token {
            r.metadata_mut().insert("authorization", t.parse().unwrap());
        }
        r
    };
    for bad in [
        None,
        Some("Bearer wrong"),
        Some("s3cret-token"),
        Some("Bearer s3cret-token2"),
    ] {
        let err = s.client.get_model_info(with(bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{bad:?}");
    }
    s.client
        .get_model_info(with(Some("Bearer s3cret-token")))
        .await
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.running.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    health
        .check(HealthCheckRequest {
            service: server::SERVICE_NAME.into(),
        })
        .await
        .unwrap();
    s.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_with_a_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let state = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (state.path().join("cert.pem"), state.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut opts = options(state.path());
    opts.tls = Some(server::TlsFiles {
        cert: cert_path,
        key: key_path,
    });
    let running = server::start(opts).await.unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "https://localhost:{}",
        running.addr.port()
    ))
    .unwrap()
    .tls_config(tls)
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut c = server::proto::recommender_client::RecommenderClient::new(channel);
    c.get_model_info(GetModelInfoRequest {}).await.unwrap();
    // Plain text is refused.
    let plain = server::proto::recommender_client::RecommenderClient::connect(format!(
        "http://{}",
        running.addr
    ))
    .await;
    if let Ok(mut p) = plain {
        assert!(p.get_model_info(GetModelInfoRequest {}).await.is_err());
    }
    running.stop().await.unwrap();
}

fn ev(t: i32, item: Option<u64>, ts: i64) -> Event {
    Event {
        r#type: t,
        item_id: item,
        query: None,
        ts_ms: ts,
        value: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_invalid_argument_naming_the_field() {
    let f = fixture();
    let mut s = start().await;
    let item = *f.items.keys().next().unwrap();
    let base = RecommendRequest {
        user_id: Some(1),
        k: 10,
        ..Default::default()
    };
    let cases: Vec<(RecommendRequest, &str)> = vec![
        (
            RecommendRequest {
                k: 0,
                ..base.clone()
            },
            "k:",
        ),
        (
            RecommendRequest {
                k: 1001,
                ..base.clone()
            },
            "k:",
        ),
        (
            RecommendRequest {
                events: vec![view(item, 5), ev(99, Some(item), 5)],
                ..base.clone()
            },
            "events[1].type",
        ),
        (
            RecommendRequest {
                events: vec![ev(0, Some(item), 5)],
                ..base.clone()
            },
            "events[0].type",
        ),
        (
            RecommendRequest {
                events: vec![ev(1, Some(item), -7)],
                ..base.clone()
            },
            "events[0].ts_ms",
        ),
        (
            RecommendRequest {
                events: vec![ev(1, None, 5)],
                ..base.clone()
            },
            "events[0].item_id",
        ),
        (
            RecommendRequest {
                events: vec![Event {
                    value: Some(f32::NAN),
                    ..view(item, 5)
                }],
                ..base.clone()
            },
            "events[0].value",
        ),
        (
            RecommendRequest {
                events: vec![view(item, 5); 513],
                ..base.clone()
            },
            "events:",
        ),
        (
            RecommendRequest {
                context: Some(Context {
                    ts_ms: -1,
                    user_features: vec![],
                }),
                ..base.clone()
            },
            "context.ts_ms",
        ),
        (
            RecommendRequest {
                context: Some(Context {
                    ts_ms: i64::MAX,
                    user_features: vec![],
                }),
                ..base.clone()
            },
            "context.ts_ms",
        ),
        (
            RecommendRequest {
                filter: Some(Filter {
                    include_categories: vec!["no such category".into()],
                    ..Default::default()
                }),
                ..base.clone()
            },
            "filter.include_categories[0]",
        ),
        (
            RecommendRequest {
                filter: Some(Filter {
                    exclude_categories: vec!["nope".into()],
                    ..Default::default()
                }),
                ..base.clone()
            },
            "filter.exclude_categories[0]",
        ),
        (
            RecommendRequest {
                nprobe: Some(0),
                ..base.clone()
            },
            "nprobe",
        ),
        (
            RecommendRequest {
                nprobe: Some(1_000_000),
                ..base.clone()
            },
            "nprobe",
        ),
    ];
    for (req, field) in cases {
        let err = s.client.recommend(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let err = s
        .client
        .record_events(RecordEventsRequest {
            users: vec![UserEvents {
                user_id: 3,
                events: vec![view(item, 5), ev(42, Some(item), 5)],
            }],
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("users[0].events[1].type"),
        "{}",
        err.message()
    );
    let err = s
        .client
        .similar_items(SimilarItemsRequest {
            item_id: u64::MAX,
            k: 5,
            filter: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = s
        .client
        .similar_items(SimilarItemsRequest {
            item_id: item,
            k: 0,
            filter: None,
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("k:"));

    // Deadlines: one already passed gets DEADLINE_EXCEEDED, not a result.
    let mut late = tonic::Request::new(base.clone());
    late.set_timeout(Duration::from_nanos(1));
    let err = s.client.recommend(late).await.unwrap_err();
    // The client's own timer may fire before the server's answer arrives (on a loaded machine);
    // what must never come back is a result.
    let client_gave_up = err.code() == Code::Cancelled && err.message() == "Timeout expired";
    assert!(
        err.code() == Code::DeadlineExceeded || client_gave_up,
        "{err:?}"
    );

    // Larger than the message limit (4 MiB by default).
    let huge = RecommendRequest {
        filter: Some(Filter {
            exclude_item_ids: (0..600_000).map(|i| u64::MAX - i).collect(),
            ..Default::default()
        }),
        ..base.clone()
    };
    let err = s.client.recommend(huge).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{err:?}"
    );
    // Unknown item ids are allowed (ignored for the user vector).
    let ok = s
        .client
        .recommend(RecommendRequest {
            events: vec![view(u64::MAX, 5)],
            ..base.clone()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.items.len(), 10);
    s.running.stop().await.unwrap();
}

/// A caller who sends a request's headers and never its body holds no admission place (one
/// connection of such streams kept every other client out when the place was taken from the
/// headers), and the server ends the stream after its request timeout.
#[tokio::test]
async fn a_request_whose_body_never_comes_holds_no_place() {
    let state = tempfile::tempdir().unwrap();
    let mut opts = options(state.path());
    opts.config.max_in_flight = 1;
    opts.config.request_timeout_ms = 300;
    let s = start_with(opts, state).await;
    let user = fixture().active_user();
    let recommend = || {
        let mut c = s.client.clone();
        async move {
            c.recommend(RecommendRequest {
                user_id: Some(user),
                k: 5,
                ..Default::default()
            })
            .await
        }
    };
    // The Recommend method, called with a body stream that never yields a message.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.running.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stalled = tokio::spawn(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let body = futures_util::stream::pending::<RecommendRequest>();
        let path = http::uri::PathAndQuery::from_static("/twotower.v1.Recommender/Recommend");
        let codec = tonic_prost::ProstCodec::<RecommendRequest, RecommendResponse>::default();
        grpc.client_streaming(tonic::Request::new(body), path, codec)
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The only place (max_in_flight = 1) is free for a caller whose body comes.
    recommend().await.unwrap();
    // The server gives up on the missing body after its request timeout (and a margin).
    let ended = tokio::time::timeout(Duration::from_secs(10), stalled).await;
    assert!(ended
        .expect("the stalled call was never ended")
        .unwrap()
        .is_err());
    recommend().await.unwrap();
    s.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_with_resource_exhausted_instead_of_queued() {
    let state = tempfile::tempdir().unwrap();
    let mut opts = options(state.path());
    opts.config.max_in_flight = 1;
    let s = start_with(opts, state).await;
    let user = fixture().active_user();
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let mut c = s.client.clone();
        tasks.push(tokio::spawn(async move {
            c.recommend(RecommendRequest {
                user_id: Some(user + i % 7),
                k: 100,
                ..Default::default()
            })
            .await
            .map(|_| ())
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                assert!(e.message().contains("max_in_flight"), "{}", e.message());
                refused += 1;
            }
        }
    }
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    // Once the burst is over, requests are admitted again.
    let mut c = s.client.clone();
    c.recommend(RecommendRequest {
        user_id: Some(user),
        k: 5,
        ..Default::default()
    })
    .await
    .unwrap();
    s.running.stop().await.unwrap();
}
