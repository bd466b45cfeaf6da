//! TensorFlow's tensor-bundle messages, as prost structs written by hand from
//! `tensorflow/core/protobuf/tensor_bundle.proto` and its imports (field numbers and types
//! only; no `protoc` needed).

/// `DataType` values we read or write.
pub(crate) const DT_FLOAT: i32 = 1;
pub(crate) const DT_INT32: i32 = 3;
pub(crate) const DT_INT64: i32 = 9;
pub(crate) const DT_UINT32: i32 = 22;

/// `VersionDef`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct VersionDef {
    #[prost(int32, tag = "1")]
    pub producer: i32,
    #[prost(int32, tag = "2")]
    pub min_consumer: i32,
    #[prost(int32, repeated, tag = "3")]
    pub bad_consumers: Vec<i32>,
}

/// `BundleHeaderProto`: the value of key `""` in the index.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct BundleHeader {
    #[prost(int32, tag = "1")]
    pub num_shards: i32,
    /// 0: little-endian, 1: big-endian.
    #[prost(int32, tag = "2")]
    pub endianness: i32,
    #[prost(message, optional, tag = "3")]
    pub version: Option<VersionDef>,
}

/// `TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
    #[prost(string, tag = "2")]
    pub name: String,
}

/// `TensorShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
    #[prost(bool, tag = "3")]
    pub unknown_rank: bool,
}

/// `BundleEntryProto`: one tensor's place in the data shards. Slices (field 7) are kept only
/// as raw messages: a partitioned variable is refused.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct BundleEntry {
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShape>,
    #[prost(int32, tag = "3")]
    pub shard_id: i32,
    #[prost(int64, tag = "4")]
    pub offset: i64,
    #[prost(int64, tag = "5")]
    pub size: i64,
    #[prost(fixed32, tag = "6")]
    pub crc32c: u32,
    #[prost(bytes = "vec", repeated, tag = "7")]
    pub slices: Vec<Vec<u8>>,
}
