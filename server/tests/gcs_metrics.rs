//! The object stores' metrics, scraped from the endpoint `thaw serve --metrics` runs, after reads
//! against fake-gcs-server through a fault proxy. Its own test binary: the recorder is global,
//! and no other test may add to the counts.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]

mod common;
#[path = "common/gcs.rs"]
mod gcs;

use gcs::{FakeGcs, Fault, FaultProxy};
use thaw_server::store::{GcsStore, PutOptions, Store};

fn fault_setup(gcs: &FakeGcs) -> (GcsStore, Vec<u8>) {
    let direct = GcsStore::open(&format!("gs://snap/pre/fix?endpoint={}", gcs.endpoint())).unwrap();
    let body = common::test_data(4, 1 << 20);
    direct.put("f/obj", &body, &PutOptions::default()).unwrap();
    (direct, body)
}

fn read_all(s: &dyn Store, key: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    s.read_range(key, offset, &mut buf).unwrap();
    buf
}

#[test]
fn metrics_count_requests_retries_errors_and_latency() {
    let Some(gcs) = FakeGcs::with_bucket("snap") else {
        return;
    };
    let proxy = FaultProxy::start(gcs.port);
    let (_, body) = fault_setup(&gcs);
    let s = GcsStore::open(&format!(
        "gs://snap/pre/fix?endpoint={}&backoff-base=10ms",
        proxy.endpoint()
    ))
    .unwrap();
    // The global recorder and its endpoint, as `thaw serve --metrics` installs them.
    let server = thaw_server::metrics::MetricsServer::start("127.0.0.1:0", None).unwrap();
    proxy.inject("alt=media", &[Fault::Status(503)]);
    assert_eq!(read_all(&s, "f/obj", 0, body.len()), body);
    assert!(s.exists("f/obj").unwrap());
    let (status, _, text) = gcs::http(server.addr().port(), "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(text).unwrap();
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    };
    assert_eq!(
        value("thaw_store_requests_total{scheme=\"gs\",op=\"read\"}"),
        2.0
    );
    assert_eq!(
        value("thaw_store_retries_total{scheme=\"gs\",op=\"read\"}"),
        1.0
    );
    assert_eq!(
        value("thaw_store_errors_total{scheme=\"gs\",op=\"read\",kind=\"status_5xx\"}"),
        1.0
    );
    assert_eq!(
        value("thaw_store_bytes_received_total{scheme=\"gs\",op=\"read\"}"),
        body.len() as f64
    );
    assert_eq!(
        value("thaw_store_requests_total{scheme=\"gs\",op=\"stat\"}"),
        1.0
    );
    assert_eq!(
        value("thaw_store_first_byte_seconds_count{scheme=\"gs\",op=\"read\"}"),
        2.0
    );
    assert_eq!(
        value("thaw_store_operation_seconds_count{scheme=\"gs\",op=\"read\"}"),
        1.0
    );
    assert!(
        text.contains("thaw_store_operation_seconds_bucket{scheme=\"gs\",op=\"read\",le=\"0.1\"}"),
        "{text}"
    );
}
