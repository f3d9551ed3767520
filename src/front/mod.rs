//! The front ends: each decodes its protocol into the core's request and encodes the
//! core's answer. None of them decides anything a request means.

pub mod answer;
pub mod body_budget;
pub mod connections;
pub mod extract;
pub mod grpc;
pub mod grpc_decode;
pub mod grpc_preface;
pub mod head_limits;
pub mod http;
pub mod large_answers;
pub mod native;
pub mod oip;
pub mod openapi;
pub mod rest;
pub mod schema;
pub mod values;
