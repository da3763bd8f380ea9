//! The operations endpoint of a long-running binary: `/metrics` (Prometheus
//! text format), `/healthz` (the process answers) and `/readyz` (every
//! service it needs answered its last request).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use outbox_core::metrics_catalog::{self, Metric};
use outbox_core::Health;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Options of the operations endpoint.
#[derive(Debug, Clone, Args)]
pub struct OpsArgs {
    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoint, or `off`.
    /// Port 0 picks a free port (logged at start).
    #[arg(long, env = "OUTBOX_METRICS_ADDR", value_name = "ADDR|off")]
    pub metrics_addr: Option<String>,
}

/// Seconds buckets of the latency histograms: 1 ms to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets of the batch-size histograms.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0,
];

/// A running operations endpoint.
#[derive(Debug)]
pub struct Ops {
    /// The address it listens on (the real port when 0 was asked for).
    pub addr: SocketAddr,
}

impl OpsArgs {
    /// Installs the Prometheus recorder and serves the endpoint until
    /// `shutdown`; `None` with `off`. `default_addr` is the binary's own
    /// default, so a relay and a consumer on one host do not collide.
    /// `exported` are the parts of the metrics catalog the binary runs,
    /// described and registered at once (errors counted as `loop_name`),
    /// so a scrape sees every series from the start.
    ///
    /// Fails when the address is taken: a scrape target that silently moved
    /// would hide the binary from monitoring.
    pub async fn start(
        &self,
        default_addr: &str,
        health: Health,
        (loop_name, exported): (&'static str, &[&[Metric]]),
        shutdown: CancellationToken,
    ) -> anyhow::Result<Option<Ops>> {
        let text = self.metrics_addr.as_deref().unwrap_or(default_addr);
        if text.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let addr: SocketAddr = text.parse().with_context(|| {
            format!("--metrics-addr {text:?} is not HOST:PORT (e.g. 127.0.0.1:9464) or `off`")
        })?;
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!(
                "cannot listen on {addr} for /metrics (--metrics-addr / OUTBOX_METRICS_ADDR): \
                 pick a free port, 127.0.0.1:0 for any, or `off`"
            )
        })?;
        let addr = listener.local_addr()?;
        let handle = install_recorder()?;
        let stages: Vec<_> = health
            .states()
            .into_iter()
            .map(|(stage, _)| stage)
            .collect();
        for part in exported {
            metrics_catalog::describe(loop_name, &stages, part);
        }
        health.export();
        info!(%addr, "serving /metrics, /healthz and /readyz");
        crate::spawn_background(serve(listener, handle, health, shutdown));
        Ok(Some(Ops { addr }))
    }
}

fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), BATCH_BUCKETS)?
        .install_recorder()
        .context("installing the Prometheus metrics recorder")?;
    // Without the exporter's own HTTP listener, nothing else trims old
    // histogram samples.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    health: Health,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    debug!(error = %err, "accepting a /metrics connection failed");
                    continue;
                }
            },
        };
        let handle = handle.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&request, &handle, &health);
                async move { Ok::<_, Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                debug!(error = %err, "a /metrics connection ended with an error");
            }
        });
    }
}

fn respond<B>(
    request: &Request<B>,
    handle: &PrometheusHandle,
    health: &Health,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", handle.render()),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => {
            let mut body = String::new();
            for (scope, stage, state) in health.components() {
                if scope.is_empty() {
                    body.push_str(&format!("{stage}: {state}\n"));
                } else {
                    body.push_str(&format!("{scope}: {stage}: {state}\n"));
                }
            }
            let status = if health.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "text/plain", body)
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
