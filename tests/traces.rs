//! Traces: with `[telemetry] otlp_endpoint`, the binary exports its spans over OTLP/HTTP. A
//! receiver written here stands in for the collector; a request's spans (the request, its
//! metadata queries and shard operations) arrive sharing one trace id.

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::eventually;
use common::images::png;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};

type Received = Arc<Mutex<Vec<Span>>>;

/// An OTLP/HTTP receiver: every span of every `POST /v1/traces`.
async fn start_receiver() -> (String, Received) {
    let received = Received::default();
    let app = Router::new().route("/v1/traces", post(receive)).with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, received)
}

async fn receive(State(received): State<Received>, body: Bytes) -> ([(&'static str, &'static str); 1], Vec<u8>) {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export request");
    let spans = request.resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans);
    received.lock().unwrap().extend(spans);
    ([("content-type", "application/x-protobuf")], Vec::new())
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(text) => Some(text.clone()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_spans_reach_the_collector_under_one_trace() {
    let (collector, received) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("chitram.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:{port}\"\n[telemetry]\notlp_endpoint = \"{collector}\"\n[auth]\nenabled = false\n\
             [database]\nurl = \"sqlite://data/c.db\"\n\
             [[shards]]\nname = \"a\"\nkind = \"fs\"\npath = \"data/a\"\n[[shards]]\nname = \"b\"\nkind = \"fs\"\npath = \"data/b\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitram"))
        .args(["--config", config.to_str().unwrap(), "serve"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let address = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client.get(format!("{address}/health/live")).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the server did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let form = Form::new().part("file", Part::bytes(png(5, 5, 98_000)).file_name("t.png"));
    let response = client
        .post(format!("{address}/api/v1/images/upload"))
        .header("x-request-id", "traced-upload-1")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);

    let of_the_upload = || {
        let spans = received.lock().unwrap().clone();
        let request = spans
            .iter()
            .find(|s| s.name == "request" && attribute(s, "request_id").as_deref() == Some("traced-upload-1"))
            .cloned();
        let trace: Vec<Span> = match &request {
            Some(request) => spans.into_iter().filter(|s| s.trace_id == request.trace_id).collect(),
            None => Vec::new(),
        };
        trace
    };
    eventually(Duration::from_secs(30), "the upload's spans reach the collector", || async {
        let trace = of_the_upload();
        ["request", "metadata_query", "shard_operation"].iter().all(|name| trace.iter().any(|s| s.name == *name))
    })
    .await;
    let trace = of_the_upload();
    let request = trace.iter().find(|s| s.name == "request").unwrap();
    assert_eq!(request.trace_id.len(), 16);
    assert!(
        trace.iter().filter(|s| s.name != "request").all(|s| !s.parent_span_id.is_empty()),
        "children of the request"
    );
    let write =
        trace.iter().find(|s| s.name == "shard_operation" && attribute(s, "operation").as_deref() == Some("write"));
    assert!(write.is_some(), "the write to a shard is in the request's trace");
    let _ = child.kill();
    let _ = child.wait();
}
