//! Writing ONNX: a protobuf graph builder ([`builder`]) and the BitNet decoder graph ([`bitnet`]).

pub mod bitnet;
pub mod builder;
pub mod functions;
