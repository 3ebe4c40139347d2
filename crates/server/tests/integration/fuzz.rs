//! Arbitrary bytes as request bodies, and arbitrary field values: the server answers every one
//! with a status (never INTERNAL or UNKNOWN, which would mean a bug or a panic), and keeps serving.

use prost::bytes::{Buf, BufMut};
use rand::{Rng, SeedableRng};
use server::proto::{
    Context, Event, Filter, RecommendRequest, RecordEventsRequest, SimilarItemsRequest, UserEvents,
};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Status};

use crate::fixture::{fixture, start};

/// Sends and receives message bodies as raw bytes.
#[derive(Default, Clone)]
struct Raw;
struct RawEnc;
struct RawDec;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}

impl Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

const RPCS: [&str; 4] = ["Recommend", "RecordEvents", "SimilarItems", "GetModelInfo"];

fn acceptable(code: Code) -> bool {
    matches!(code, Code::Ok | Code::InvalidArgument | Code::NotFound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_bytes_and_field_values_never_break_the_server() {
    let f = fixture();
    let mut s = start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.running.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20261128);

    // 1. Random bytes, and valid messages with random bytes flipped.
    let valid = prost::Message::encode_to_vec(&RecommendRequest {
        user_id: Some(f.active_user()),
        events: vec![crate::fixture::view(*f.items.keys().next().unwrap(), 5)],
        k: 5,
        ..Default::default()
    });
    for i in 0..300 {
        let body: Vec<u8> = if i % 2 == 0 {
            (0..rng.random_range(0..200))
                .map(|_| rng.random())
                .collect()
        } else {
            let mut b = valid.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..b.len());
                b[at] = rng.random();
            }
            b
        };
        let rpc = RPCS[i % RPCS.len()];
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path = PathAndQuery::try_from(format!("/twotower.v1.Recommender/{rpc}")).unwrap();
        let code = match grpc
            .unary(tonic::Request::new(body.clone()), path, Raw)
            .await
        {
            Ok(_) => Code::Ok,
            // Undecodable protobuf is INTERNAL by gRPC's status-code table (tonic's codec says
            // so before any handler runs); that is the one INTERNAL allowed here.
            Err(e) if e.code() == Code::Internal && e.message().contains("failed to decode") => {
                Code::InvalidArgument
            }
            Err(e) => e.code(),
        };
        assert!(acceptable(code), "{rpc} with {body:?}: {code:?}");
    }

    // 2. Random field values, often near the limits.
    let ids: Vec<u64> = f.items.keys().copied().collect();
    let cats: Vec<String> = f
        .items
        .values()
        .flat_map(|i| i.categories.clone())
        .collect();
    let pick_u64 = |rng: &mut rand_chacha::ChaCha8Rng| match rng.random_range(0..4) {
        0 => ids[rng.random_range(0..ids.len())],
        1 => 0,
        2 => u64::MAX,
        _ => rng.random(),
    };
    let pick_i64 = |rng: &mut rand_chacha::ChaCha8Rng| match rng.random_range(0..5) {
        0 => 1_700_000_000_000 + rng.random_range(0..1_000_000),
        1 => 0,
        2 => i64::MIN,
        3 => i64::MAX,
        _ => rng.random(),
    };
    let string = |rng: &mut rand_chacha::ChaCha8Rng| -> String {
        match rng.random_range(0..4) {
            0 => cats[rng.random_range(0..cats.len())].clone(),
            1 => String::new(),
            2 => "é🙂\0\u{202e}".repeat(rng.random_range(0..300)),
            _ => (0..rng.random_range(0..20))
                .map(|_| rng.random_range(' '..'~'))
                .collect(),
        }
    };
    let event = |rng: &mut rand_chacha::ChaCha8Rng| Event {
        r#type: match rng.random_range(0..3) {
            0 => rng.random_range(0..8),
            1 => rng.random(),
            _ => 1,
        },
        item_id: rng.random_bool(0.8).then(|| pick_u64(rng)),
        query: rng.random_bool(0.3).then(|| string(rng)),
        ts_ms: pick_i64(rng),
        value: rng.random_bool(0.3).then(|| match rng.random_range(0..4) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            _ => rng.random(),
        }),
    };
    let filter = |rng: &mut rand_chacha::ChaCha8Rng| {
        rng.random_bool(0.5).then(|| Filter {
            include_categories: (0..rng.random_range(0..3)).map(|_| string(rng)).collect(),
            exclude_categories: (0..rng.random_range(0..3)).map(|_| string(rng)).collect(),
            exclude_item_ids: (0..rng.random_range(0..50))
                .map(|_| pick_u64(rng))
                .collect(),
            exclude_seen: [None, Some(true), Some(false)][rng.random_range(0..3)],
        })
    };
    let k = |rng: &mut rand_chacha::ChaCha8Rng| match rng.random_range(0..4) {
        0 => rng.random(),
        1 => 0,
        2 => 1000,
        _ => rng.random_range(1..50),
    };
    for i in 0..300 {
        let code = match i % 3 {
            0 => {
                let req = RecommendRequest {
                    user_id: rng.random_bool(0.7).then(|| pick_u64(&mut rng)),
                    events: (0..rng.random_range(0..20))
                        .map(|_| event(&mut rng))
                        .collect(),
                    context: rng.random_bool(0.5).then(|| Context {
                        ts_ms: pick_i64(&mut rng),
                        user_features: (0..rng.random_range(0..5))
                            .map(|_| string(&mut rng))
                            .collect(),
                    }),
                    k: k(&mut rng),
                    filter: filter(&mut rng),
                    nprobe: rng.random_bool(0.3).then(|| rng.random_range(0..40)),
                };
                s.client
                    .recommend(req)
                    .await
                    .err()
                    .map_or(Code::Ok, |e| e.code())
            }
            1 => {
                let req = RecordEventsRequest {
                    users: (0..rng.random_range(0..3))
                        .map(|_| UserEvents {
                            user_id: pick_u64(&mut rng),
                            events: (0..rng.random_range(0..5))
                                .map(|_| event(&mut rng))
                                .collect(),
                        })
                        .collect(),
                    // Sometimes repeated, sometimes past the 128-byte limit.
                    idempotency_key: "k".repeat(rng.random_range(0..140)),
                };
                s.client
                    .record_events(req)
                    .await
                    .err()
                    .map_or(Code::Ok, |e| e.code())
            }
            _ => {
                let req = SimilarItemsRequest {
                    item_id: pick_u64(&mut rng),
                    k: k(&mut rng),
                    filter: filter(&mut rng),
                };
                s.client
                    .similar_items(req)
                    .await
                    .err()
                    .map_or(Code::Ok, |e| e.code())
            }
        };
        assert!(acceptable(code), "case {i}: {code:?}");
    }
    // Still serving, with personalised answers.
    let r = s
        .client
        .recommend(RecommendRequest {
            user_id: Some(f.active_user()),
            k: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.items.len(), 5);
    s.running.stop().await.unwrap();
}
