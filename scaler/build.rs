//! Generates the gRPC server and client of KEDA's `externalscaler.ExternalScaler`
//! service with tonic's manual builder (no protoc needed); the messages are
//! declared in `src/proto.rs`.

fn main() {
    let method = |name: &str, route: &str, input: &str, output: &str, streaming: bool| {
        let builder = tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::proto::{input}"))
            .output_type(format!("crate::proto::{output}"))
            .codec_path("tonic_prost::ProstCodec");
        if streaming { builder.server_streaming().build() } else { builder.build() }
    };
    let service = tonic_build::manual::Service::builder()
        .name("ExternalScaler")
        .package("externalscaler")
        .method(method("is_active", "IsActive", "ScaledObjectRef", "IsActiveResponse", false))
        .method(method("stream_is_active", "StreamIsActive", "ScaledObjectRef", "IsActiveResponse", true))
        .method(method("get_metric_spec", "GetMetricSpec", "ScaledObjectRef", "GetMetricSpecResponse", false))
        .method(method("get_metrics", "GetMetrics", "GetMetricsRequest", "GetMetricsResponse", false))
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
    println!("cargo:rerun-if-changed=build.rs");
}
