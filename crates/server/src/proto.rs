//! The generated `twotower.v1` wire types and the descriptor set used by server reflection.
//! Engine code never sees these types; conversions live next to the handlers.

#![allow(missing_docs, clippy::all)]

tonic::include_proto!("twotower.v1");

/// Encoded `FileDescriptorSet` of `recommender.proto`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("twotower_descriptor");
