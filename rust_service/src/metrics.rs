//! Prometheus metrics with BentoML's names and labels, so one dashboard serves the BentoML
//! services and this one: `bentoml_service_request_total`,
//! `bentoml_service_request_duration_seconds` (BentoML's default buckets) and
//! `bentoml_service_request_in_progress`, labelled `endpoint`, `http_response_code`,
//! `service_name`, `service_version`, plus `runner_name`, which BentoML also sets.
//! As in BentoML, every path but /metrics is counted.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// BentoML's `DEFAULT_BUCKET` (seconds), without the implicit +Inf.
const BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 180.0,
];

#[derive(Debug, Default, Clone)]
struct Series {
    count: u64,
    sum: f64,
    buckets: [u64; BUCKETS.len()],
}

#[derive(Debug, Default)]
struct State {
    requests: BTreeMap<(String, u16), Series>,
    in_progress: BTreeMap<String, i64>,
}

#[derive(Debug)]
pub struct Metrics {
    service_name: String,
    service_version: String,
    state: Mutex<State>,
}

impl Metrics {
    pub fn new(service_name: &str, service_version: &str, routes: &[&str]) -> Self {
        let mut state = State::default();
        // Like BentoML, start the API routes at zero so rate() works from the first scrape.
        for route in routes {
            for code in [200, 500] {
                state
                    .requests
                    .insert(((*route).to_string(), code), Series::default());
            }
            state.in_progress.insert((*route).to_string(), 0);
        }
        Self {
            service_name: service_name.to_string(),
            service_version: service_version.to_string(),
            state: Mutex::new(state),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the counters inconsistent in a way
        // that matters; keep serving them.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn start(&self, endpoint: &str) {
        *self
            .state()
            .in_progress
            .entry(endpoint.to_string())
            .or_default() += 1;
    }

    pub fn finish(&self, endpoint: &str, status: u16, seconds: f64) {
        let mut state = self.state();
        if let Some(n) = state.in_progress.get_mut(endpoint) {
            *n -= 1;
        }
        let series = state
            .requests
            .entry((endpoint.to_string(), status))
            .or_default();
        series.count += 1;
        series.sum += seconds;
        for (bucket, le) in series.buckets.iter_mut().zip(BUCKETS) {
            if seconds <= le {
                *bucket += 1;
            }
        }
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let state = self.state();
        let service = format!(
            "runner_name=\"{}\",service_name=\"{}\",service_version=\"{}\"",
            escape(&self.service_name),
            escape(&self.service_name),
            escape(&self.service_version)
        );
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP bentoml_service_request_total Total number of HTTP requests"
        );
        let _ = writeln!(out, "# TYPE bentoml_service_request_total counter");
        for ((endpoint, code), series) in &state.requests {
            let _ = writeln!(
                out,
                "bentoml_service_request_total{{endpoint=\"{}\",http_response_code=\"{code}\",{service}}} {:?}",
                escape(endpoint),
                series.count as f64
            );
        }
        let _ = writeln!(
            out,
            "# HELP bentoml_service_request_duration_seconds HTTP request duration in seconds"
        );
        let _ = writeln!(
            out,
            "# TYPE bentoml_service_request_duration_seconds histogram"
        );
        for ((endpoint, code), series) in &state.requests {
            let labels = format!(
                "endpoint=\"{}\",http_response_code=\"{code}\",{service}",
                escape(endpoint)
            );
            for (le, n) in BUCKETS.iter().zip(series.buckets) {
                let _ = writeln!(
                    out,
                    "bentoml_service_request_duration_seconds_bucket{{{labels},le=\"{le:?}\"}} {:?}",
                    n as f64
                );
            }
            let _ = writeln!(
                out,
                "bentoml_service_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {:?}",
                series.count as f64
            );
            let _ = writeln!(
                out,
                "bentoml_service_request_duration_seconds_count{{{labels}}} {:?}",
                series.count as f64
            );
            let _ = writeln!(
                out,
                "bentoml_service_request_duration_seconds_sum{{{labels}}} {:?}",
                series.sum
            );
        }
        let _ = writeln!(
            out,
            "# HELP bentoml_service_request_in_progress Total number of HTTP requests in progress now"
        );
        let _ = writeln!(out, "# TYPE bentoml_service_request_in_progress gauge");
        for (endpoint, n) in &state.in_progress {
            let _ = writeln!(
                out,
                "bentoml_service_request_in_progress{{endpoint=\"{}\",{service}}} {:?}",
                escape(endpoint),
                *n as f64
            );
        }
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, prefix: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample {prefix}\n{text}"))
    }

    #[test]
    fn counts_requests_with_bentoml_names_and_labels() {
        let metrics = Metrics::new("weather-rust-service", "v1", &["/predict"]);
        metrics.start("/predict");
        metrics.finish("/predict", 200, 0.007);
        metrics.start("/predict");
        metrics.finish("/predict", 400, 0.2);
        metrics.start("/predict");
        let text = metrics.render();
        let labels_200 = "endpoint=\"/predict\",http_response_code=\"200\",runner_name=\"weather-rust-service\",service_name=\"weather-rust-service\",service_version=\"v1\"";
        assert_eq!(
            sample(
                &text,
                &format!("bentoml_service_request_total{{{labels_200}}}")
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "bentoml_service_request_total{endpoint=\"/predict\",http_response_code=\"500\""
            ),
            0.0
        );
        assert_eq!(
            sample(
                &text,
                "bentoml_service_request_total{endpoint=\"/predict\",http_response_code=\"400\""
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    "bentoml_service_request_duration_seconds_bucket{{{labels_200},le=\"0.005\"}}"
                )
            ),
            0.0
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    "bentoml_service_request_duration_seconds_bucket{{{labels_200},le=\"0.01\"}}"
                )
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    "bentoml_service_request_duration_seconds_bucket{{{labels_200},le=\"+Inf\"}}"
                )
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                &format!("bentoml_service_request_duration_seconds_count{{{labels_200}}}")
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "bentoml_service_request_in_progress{endpoint=\"/predict\""
            ),
            1.0
        );
        assert!(text.contains("# TYPE bentoml_service_request_duration_seconds histogram"));
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
