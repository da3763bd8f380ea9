//! OpenTelemetry traces of a binary, exported over OTLP/HTTP when asked for
//! (`--otlp-endpoint`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); off otherwise, and then the loops
//! do not even read the events' trace headers.

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

/// Options of the trace export.
#[derive(Debug, Clone, Args)]
pub struct OtelArgs {
    /// Export traces over OTLP/HTTP to this collector (its base URL, e.g.
    /// http://localhost:4318; `/v1/traces` is appended). Without it, the
    /// standard OTEL_EXPORTER_OTLP_ENDPOINT and
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT turn the export on; the other
    /// OTEL_* variables (protocol http/protobuf or http/json, headers,
    /// timeout, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
    /// OTEL_SDK_DISABLED) are respected.
    #[arg(long, env = "OUTBOX_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// The most links one batch span keeps (each is one traced event of the
/// batch), unless OTEL_SPAN_LINK_COUNT_LIMIT says otherwise: above the
/// largest batch a relay or consumer makes by default.
const MAX_LINKS: u32 = 10_000;

/// A running trace export: flushes and stops it when dropped.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Drop for Tracing {
    fn drop(&mut self) {
        // Spans still queued are sent now; a collector that does not answer
        // costs at most the exporter's timeout.
        if let Err(err) = self.provider.shutdown_with_timeout(Duration::from_secs(5)) {
            tracing::warn!(error = %err, "flushing the last spans failed");
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

impl OtelArgs {
    /// Whether spans are exported: an endpoint is given and the SDK is not
    /// disabled (`OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`).
    pub fn enabled(&self) -> bool {
        let disabled = std::env::var("OTEL_SDK_DISABLED")
            .is_ok_and(|v| v.eq_ignore_ascii_case("true"))
            || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
        let endpoint = self.otlp_endpoint.is_some()
            || env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        endpoint && !disabled
    }

    /// Installs the global tracer provider exporting to the collector, as
    /// `service` unless OTEL_SERVICE_NAME names it; `None` when the export
    /// is off. Keep the guard until the end of `main`: dropping it sends
    /// what is still queued.
    pub fn start(&self, service: &'static str) -> anyhow::Result<Option<Tracing>> {
        if !self.enabled() {
            return Ok(None);
        }
        let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
        // The specification's default is protobuf; the crate, built with
        // JSON support too, would default to JSON.
        if !env_set("OTEL_EXPORTER_OTLP_PROTOCOL") && !env_set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        {
            exporter = exporter.with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
        }
        if let Some(base) = &self.otlp_endpoint {
            exporter = exporter.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
        }
        let exporter = exporter.build().context(
            "setting up the OTLP trace export (--otlp-endpoint / OTEL_EXPORTER_OTLP_*): \
             OTEL_EXPORTER_OTLP_PROTOCOL may be http/protobuf or http/json (gRPC is not built in)",
        )?;
        let mut resource = Resource::builder();
        if !env_set("OTEL_SERVICE_NAME") {
            resource = resource.with_service_name(service);
        }
        let links = std::env::var("OTEL_SPAN_LINK_COUNT_LIMIT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MAX_LINKS);
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .with_max_links_per_span(links)
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        tracing::info!(service, "exporting traces over OTLP");
        Ok(Some(Tracing { provider }))
    }
}
