//! Writing ONNX: a protobuf graph builder ([`builder`]), the BitNet decoder graph ([`bitnet`]) and the function
//! bodies of its ops ([`functions`]); [`inspect`] reads facts back out of an exported graph.

pub mod bitnet;
pub mod builder;
pub mod functions;
pub mod inspect;
