//! Routes: POST /predict, /predict/upload, /predict/raw, GET /livez, /readyz, /metrics.
//! Every error, including a wrong path or method and an oversized body, is a JSON
//! `{"error": ...}` body, and every 503 says when to come back (`Retry-After`).
//!
//! A predict request goes through [`receive`] first: what its headers decide (media type,
//! declared length, admission) is decided before its body is read, and a refused body is
//! read and thrown away, never parsed. A request that finds every place taken waits for one
//! with its body unread. See docs/contract.md, "Under load, slow clients, shutdown".

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{App, HttpRequest, HttpResponse, ResponseError};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::admission::{Admission, Permit, Refused};
use crate::arrival;
use crate::body::{self, BodyKind};
use crate::error::AppError;
use crate::infer::Inferencer;
use crate::metrics::Metrics;

/// The three ways to send an image: JSON with base64, a multipart upload, the file itself.
pub const PREDICT: &str = "/predict";
pub const PREDICT_UPLOAD: &str = "/predict/upload";
pub const PREDICT_RAW: &str = "/predict/raw";
/// The routes that answer a prediction; their metrics start at zero.
pub const PREDICT_ROUTES: [&str; 3] = [PREDICT, PREDICT_UPLOAD, PREDICT_RAW];

pub struct AppState {
    pub inferencer: Inferencer,
    pub labels: Arc<[String]>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub admission: Arc<Admission>,
    pub limits: Limits,
}

/// What a predict request may take, from `Config::limits`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// How much of a refused body is read and thrown away before answering.
    pub discard_body_bytes: usize,
    /// From the headers to the end of the body.
    pub body_timeout: Duration,
    /// From the headers to the answer: a request still waiting for a place then, or that a
    /// worker could not finish by then, gets 503.
    pub request_timeout: Duration,
    /// How much sooner than that an answer is planned to leave, for its way to the client.
    pub answer_headroom: Duration,
    /// The `Retry-After` of every 503.
    pub retry_after_seconds: u32,
}

impl Limits {
    /// From the headers to when an answer is planned to leave: the deadline less the headroom.
    pub fn answer_within(&self) -> Duration {
        self.request_timeout.saturating_sub(self.answer_headroom)
    }
}

/// The service: routes, then [`retry_after`], then [`track`] around them all. What
/// main.rs serves and what the tests call.
pub fn app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(state)
        .wrap(from_fn(retry_after))
        .wrap(from_fn(track))
        .configure(configure)
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(PREDICT)
            .route(web::post().to(predict))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(PREDICT_UPLOAD)
            .route(web::post().to(predict_upload))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(PREDICT_RAW)
            .route(web::post().to(predict_raw))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/livez")
            .route(web::get().to(livez))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/readyz")
            .route(web::get().to(readyz))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(metrics))
            .default_service(web::to(method_not_allowed)),
    )
    .default_service(web::to(not_found));
}

/// Request counting and timing for every path but /metrics, as BentoML does. Use with
/// `actix_web::middleware::from_fn(track)`.
pub async fn track(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if req.path() == "/metrics" {
        return next.call(req).await;
    }
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .map(|s| Arc::clone(&s.metrics));
    // Known routes by their pattern, anything else under one label (no label per random path).
    let endpoint = req
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_string());
    let started = Instant::now();
    let mut in_flight = InFlight::start(metrics, endpoint);
    let result = next.call(req).await;
    let status = match &result {
        Ok(res) => res.status().as_u16(),
        Err(err) => err.as_response_error().status_code().as_u16(),
    };
    let seconds = started.elapsed().as_secs_f64();
    let endpoint = in_flight.finish(status, seconds);
    if status >= 500 && status != 503 {
        tracing::warn!(
            endpoint,
            status,
            elapsed_ms = seconds * 1e3,
            "request failed"
        );
    } else {
        tracing::debug!(endpoint, status, elapsed_ms = seconds * 1e3, "request");
    }
    result
}

/// A request counted as in progress until it is answered, or until actix drops it because its
/// client has gone: it is then counted as a 503, as the bentos count a request whose client
/// left before it could run.
struct InFlight {
    metrics: Option<Arc<Metrics>>,
    endpoint: String,
    started: Instant,
    finished: bool,
}

impl InFlight {
    fn start(metrics: Option<Arc<Metrics>>, endpoint: String) -> Self {
        if let Some(m) = &metrics {
            m.start(&endpoint);
        }
        Self {
            metrics,
            endpoint,
            started: Instant::now(),
            finished: false,
        }
    }

    /// Records the answer; returns the endpoint label for logging.
    fn finish(&mut self, status: u16, seconds: f64) -> String {
        self.finished = true;
        if let Some(m) = &self.metrics {
            m.finish(&self.endpoint, status, seconds);
        }
        std::mem::take(&mut self.endpoint)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.finished {
            let seconds = self.started.elapsed().as_secs_f64();
            self.finish(503, seconds);
        }
    }
}

/// Puts `Retry-After` on every 503 (overloaded, not started in time, not ready), here
/// rather than in `AppError` because its value is configured.
pub async fn retry_after(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let seconds = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.limits.retry_after_seconds);
    let mut res = next.call(req).await?;
    if let (StatusCode::SERVICE_UNAVAILABLE, Some(seconds)) = (res.status(), seconds) {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    Ok(res)
}

/// A predict request admitted and its body read whole.
struct Received {
    /// Its place among the requests held, kept until it is answered.
    permit: Permit,
    body: BytesMut,
    /// When its headers were in, from which the request timeout counts.
    headers_at: Instant,
}

/// A predict request refused before its body was read whole.
struct Refusal {
    error: AppError,
    /// What is left of its body, when it was not read to the end.
    unread: Option<Payload>,
}

/// A response body that holds the unread rest of the request body until it has been
/// sent. actix-http decides what to do with a request body nobody read when it writes the
/// response's head and again when it has sent the response's body: as long as the request
/// body is held, it answers `Connection: close` and closes the connection after a short
/// linger (`client_disconnect_timeout`). Had the handler dropped the request body, it would
/// read a chunked one to its end itself, however long and slow.
struct HoldingUnread {
    body: BoxBody,
    _unread: Payload,
}

impl MessageBody for HoldingUnread {
    type Error = <BoxBody as MessageBody>::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_next(cx)
    }
}

impl Refusal {
    fn into_response(self) -> HttpResponse {
        let response = self.error.error_response();
        match self.unread {
            Some(unread) => response
                .map_body(|_, body| HoldingUnread {
                    body,
                    _unread: unread,
                })
                .map_into_boxed_body(),
            None => response,
        }
    }
}

/// Admits a predict request for an endpoint that takes `kind` and reads its body, or
/// refuses it. In order, at the headers: the media type (415/400) and the declared length
/// (400/413); then the request's place, waited for with the body unread if none is free
/// (503 at once when as many already wait, 503 if none frees within the request timeout);
/// then the bytes its declared body reserves (503); then while the body arrives: its size
/// (413), the bytes a chunked one reserves (503) and the body timeout (408). A body refused
/// before it was read whole is read and thrown away, up to `discard_body_bytes` and the
/// body timeout, before the answer, unless the client sent `Expect: 100-continue`.
async fn receive(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    kind: BodyKind,
) -> Result<Received, Refusal> {
    let limits = &state.limits;
    let headers_at = arrival::headers_arrived(req);
    let deadline = headers_at + limits.body_timeout;
    let mut payload = payload.into_inner();
    let declared = match body::check_headers(req.headers(), kind, limits.max_body_bytes) {
        Ok(declared) => declared,
        // A length that large is no body to wait for.
        Err(error @ AppError::InvalidContentLength) => {
            return Err(Refusal {
                error,
                unread: Some(payload),
            })
        }
        Err(error) => return Err(refuse(error, payload, req, limits, deadline).await),
    };
    // The payload is not polled while the request waits: once its small buffer is full,
    // actix-http stops reading the connection, so TCP holds the client back rather than
    // the service taking in a body it cannot serve yet.
    // No place is given once a run could no longer end in time, nor one that
    // comes while the requests placed ahead would keep this one past it: by the runs ahead
    // at the mean run time, or by how long the recent requests held their place, whichever
    // is longer (the first answers for a load that has just risen, the second for one
    // that has lasted).
    let answer_by = headers_at + limits.answer_within();
    let place_by = answer_by
        .checked_sub(state.inferencer.expected_run())
        .unwrap_or(headers_at);
    let admission = &state.admission;
    let in_time = |now| {
        let runs_ahead = state.inferencer.queue_time(admission.capacity());
        now + runs_ahead.max(admission.time_to_answer()) <= answer_by
    };
    let admitted = admission.admit(place_by, in_time).await;
    let mut permit = match admitted {
        Ok(permit) => permit,
        Err(refused) => {
            let error = match refused {
                Refused::Full => AppError::Overloaded,
                Refused::TimedOut => AppError::NotStarted {
                    within: limits.request_timeout,
                },
            };
            return Err(refuse(error, payload, req, limits, deadline).await);
        }
    };
    if !permit.reserve(declared.unwrap_or(0)) {
        // Refused: the body thrown away does not hold a place.
        drop(permit);
        let error = AppError::TooManyBodiesArriving;
        return Err(refuse(error, payload, req, limits, deadline).await);
    }
    let read = body::read(
        &mut payload,
        declared,
        limits.max_body_bytes,
        (headers_at, limits.body_timeout),
        |bytes| permit.reserve(bytes),
    )
    .await;
    match read {
        Ok(body) => {
            permit.body_complete();
            Ok(Received {
                permit,
                body,
                headers_at,
            })
        }
        Err(error @ AppError::BodyTimeout { .. }) => Err(Refusal {
            error,
            unread: Some(payload),
        }),
        Err(error @ AppError::BodyRead(_)) => Err(Refusal {
            error,
            unread: None,
        }),
        Err(error) => {
            // Refused: the body thrown away does not hold a place.
            drop(permit);
            Err(refuse(error, payload, req, limits, deadline).await)
        }
    }
}

async fn refuse(
    error: AppError,
    mut payload: Payload,
    req: &HttpRequest,
    limits: &Limits,
    deadline: Instant,
) -> Refusal {
    // A client that sent `Expect: 100-continue` reads while it sends (curl does), and
    // actix-http has told it to go on before the handler runs: answer it at once, which
    // also closes the connection, rather than take in its whole body first.
    let read_to_end = !req.headers().contains_key(header::EXPECT)
        && body::discard(&mut payload, limits.discard_body_bytes, deadline).await;
    Refusal {
        error,
        unread: (!read_to_end).then_some(payload),
    }
}

async fn predict(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let Received {
        permit,
        body,
        headers_at,
    } = match receive(&state, &req, payload, BodyKind::Json).await {
        Ok(received) => received,
        Err(refusal) => return Ok(refusal.into_response()),
    };
    let image = body::parse_predict_request(&body)?;
    drop(body);
    answer(&state, permit, image, headers_at).await
}

async fn predict_upload(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let received = match receive(&state, &req, payload, BodyKind::Multipart).await {
        Ok(received) => received,
        Err(refusal) => return Ok(refusal.into_response()),
    };
    let image = body::image_from_multipart(req.headers(), received.body.freeze()).await?;
    answer(&state, received.permit, image, received.headers_at).await
}

async fn predict_raw(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let received = match receive(&state, &req, payload, BodyKind::ImageFile).await {
        Ok(received) => received,
        Err(refusal) => return Ok(refusal.into_response()),
    };
    let image = received.body.into();
    answer(&state, received.permit, image, received.headers_at).await
}

/// Where every predict route ends once it has the image's bytes, so that the same image
/// gets the same answer whichever way it came. `permit` is the request's place, given back
/// when it is answered (or when this future is dropped, its client gone).
async fn answer(
    state: &AppState,
    permit: Permit,
    image: Vec<u8>,
    headers_at: Instant,
) -> Result<HttpResponse, AppError> {
    let probabilities = state.inferencer.predict(image, headers_at).await?;
    permit.answered();
    let prediction = Prediction::new(&state.labels, &probabilities)?;
    Ok(HttpResponse::Ok().json(prediction))
}

async fn livez() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "alive" }))
}

async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, AppError> {
    if state.ready.load(Ordering::Acquire) {
        Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ready" })))
    } else {
        Err(AppError::NotReady)
    }
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        ))
        .body(state.metrics.render())
}

async fn not_found() -> HttpResponse {
    actix_web::ResponseError::error_response(&AppError::NotFound)
}

async fn method_not_allowed() -> HttpResponse {
    actix_web::ResponseError::error_response(&AppError::MethodNotAllowed)
}

/// `{"prediction": label, "probability": p, "probabilities": {label: p, ...}}`, labels in
/// model output order.
#[derive(Debug)]
pub struct Prediction<'a> {
    labels: &'a [String],
    probabilities: &'a [f32],
    top: usize,
}

impl<'a> Prediction<'a> {
    pub fn new(labels: &'a [String], probabilities: &'a [f32]) -> Result<Self, AppError> {
        if labels.len() != probabilities.len() || probabilities.iter().any(|p| !p.is_finite()) {
            return Err(AppError::Inference(
                "the model returned an invalid distribution".into(),
            ));
        }
        let top = probabilities.iter().enumerate().fold(0, |best, (i, p)| {
            if *p > probabilities[best] {
                i
            } else {
                best
            }
        });
        Ok(Self {
            labels,
            probabilities,
            top,
        })
    }
}

impl Serialize for Prediction<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct ByLabel<'b>(&'b [String], &'b [f32]);
        impl Serialize for ByLabel<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(self.0.len()))?;
                for (label, p) in self.0.iter().zip(self.1) {
                    map.serialize_entry(label, p)?;
                }
                map.end()
            }
        }
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("prediction", &self.labels[self.top])?;
        map.serialize_entry("probability", &self.probabilities[self.top])?;
        map.serialize_entry("probabilities", &ByLabel(self.labels, self.probabilities))?;
        map.end()
    }
}

/// The service's state on a model that needs no ONNX Runtime, for the tests here and in
/// server.rs.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Limits small enough for tests: 64 KiB bodies, 1 MiB discarded, 30 s timeouts.
    pub const LIMITS: Limits = Limits {
        max_body_bytes: 64 * 1024,
        discard_body_bytes: 1024 * 1024,
        body_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(30),
        answer_headroom: Duration::ZERO,
        retry_after_seconds: 1,
    };

    /// The state main.rs builds, around `inferencer`, holding at most `capacity` requests
    /// and `max_pending_bytes` of bodies arriving.
    pub fn state_with(
        inferencer: Inferencer,
        limits: Limits,
        capacity: usize,
        max_pending_bytes: usize,
    ) -> web::Data<AppState> {
        web::Data::new(AppState {
            inferencer,
            labels: ["red", "green", "blue"].map(String::from).into(),
            metrics: Arc::new(Metrics::new("test", "v1", &PREDICT_ROUTES)),
            ready: Arc::new(AtomicBool::new(true)),
            admission: Admission::new(capacity, capacity, max_pending_bytes),
            limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{state_with, LIMITS};
    use super::*;
    use crate::body::test_support::{body as multipart_body, content_type, field, file};
    use crate::infer::testing::FakeModel;
    use crate::infer::Batching;
    use actix_web::error::PayloadError;
    use actix_web::test::{self, TestRequest};
    use futures_util::{stream, FutureExt, StreamExt};
    use std::cell::Cell;
    use std::rc::Rc;

    const PHOTO: &[u8] = include_bytes!("../tests/fixtures/rgb_420.jpg");
    const LIMIT: usize = LIMITS.max_body_bytes;

    /// The service as main.rs puts it together, on a model that needs no ONNX Runtime.
    fn state() -> web::Data<AppState> {
        state_with(Inferencer::fake(Batching::OFF), LIMITS, 64, 1 << 20)
    }

    /// Sends `req` (with `streamed` as its body instead, if given: no Content-Length).
    async fn call_with(
        state: &web::Data<AppState>,
        req: TestRequest,
        streamed: Option<Payload>,
    ) -> (StatusCode, serde_json::Value) {
        let (status, _, json) = call_full(state, req, streamed).await;
        (status, json)
    }

    /// Like [`call_with`], with the response's headers.
    async fn call_full(
        state: &web::Data<AppState>,
        req: TestRequest,
        streamed: Option<Payload>,
    ) -> (StatusCode, header::HeaderMap, serde_json::Value) {
        let mut req = req.to_request();
        if let Some(payload) = streamed {
            *req.payload() = payload;
        }
        let app = test::init_service(app(state.clone())).await;
        let response = test::call_service(&app, req).await;
        let status = response.status();
        let headers = response.headers().clone();
        let body = test::read_body(response).await;
        let json = serde_json::from_slice(&body)
            .unwrap_or_else(|err| panic!("{status}: body is not JSON ({err}): {body:?}"));
        (status, headers, json)
    }

    async fn call(req: TestRequest) -> (StatusCode, serde_json::Value) {
        call_with(&state(), req, None).await
    }

    fn upload(content_type: &str, body: Vec<u8>) -> TestRequest {
        TestRequest::post()
            .uri(PREDICT_UPLOAD)
            .insert_header((header::CONTENT_TYPE, content_type))
            .set_payload(body)
    }

    fn raw(content_type: Option<&str>, body: &[u8]) -> TestRequest {
        let req = TestRequest::post()
            .uri(PREDICT_RAW)
            .set_payload(body.to_vec());
        match content_type {
            Some(value) => req.insert_header((header::CONTENT_TYPE, value)),
            None => req,
        }
    }

    fn error_of(json: &serde_json::Value) -> &str {
        json["error"].as_str().expect("an error body")
    }

    #[actix_web::test]
    async fn every_route_answers_the_same_for_the_same_image() {
        let json = serde_json::json!({ "image": base64_simd::STANDARD.encode_to_string(PHOTO) });
        let (status, expected) = call(
            TestRequest::post()
                .uri(PREDICT)
                .set_payload(json.to_string()),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{expected}");
        assert!(expected["prediction"].is_string());

        let form = multipart_body(&[file("image", PHOTO)]);
        let requests = [
            upload(&content_type(), form),
            raw(Some("image/jpeg"), PHOTO),
            // The bytes decide the format, not the declared type.
            raw(Some("image/png"), PHOTO),
            raw(Some("Application/Octet-Stream; charset=binary"), PHOTO),
        ];
        for req in requests {
            assert_eq!(call(req).await, (StatusCode::OK, expected.clone()));
        }
    }

    #[actix_web::test]
    async fn upload_errors() {
        let form = || multipart_body(&[file("image", PHOTO)]);
        let cases = [
            (
                upload("application/json", form()),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                TestRequest::post().uri(PREDICT_UPLOAD).set_payload(form()),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                upload("multipart/form-data", form()),
                StatusCode::BAD_REQUEST,
            ),
            (
                upload(&content_type(), b"garbage".to_vec()),
                StatusCode::BAD_REQUEST,
            ),
            (
                upload(&content_type(), multipart_body(&[file("photo", PHOTO)])),
                StatusCode::BAD_REQUEST,
            ),
            (
                upload(
                    &content_type(),
                    multipart_body(&[file("image", PHOTO), field("note", b"hi")]),
                ),
                StatusCode::BAD_REQUEST,
            ),
            (
                upload(
                    &content_type(),
                    multipart_body(&[file("image", PHOTO), file("image", PHOTO)]),
                ),
                StatusCode::BAD_REQUEST,
            ),
            (
                upload(
                    &content_type(),
                    multipart_body(&[field("image", b"https://example.com/photo.jpg")]),
                ),
                StatusCode::BAD_REQUEST,
            ),
            (
                upload(&content_type(), multipart_body(&[file("image", b"")])),
                StatusCode::BAD_REQUEST,
            ),
            (
                upload(
                    &content_type(),
                    multipart_body(&[file("image", &PHOTO[..600])]),
                ),
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (req, expected) in cases {
            let (status, json) = call(req).await;
            assert_eq!(status, expected, "{json}");
            assert!(!error_of(&json).is_empty());
        }
    }

    #[actix_web::test]
    async fn raw_errors() {
        for content_type in [
            None,
            Some("text/plain"),
            Some("image/gif"),
            Some("application/json"),
        ] {
            let (status, json) = call(raw(content_type, PHOTO)).await;
            assert_eq!(
                status,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{content_type:?}"
            );
            assert!(error_of(&json).starts_with("Content-Type is "), "{json}");
        }
        let (status, json) = call(raw(Some("image/jpeg"), b"")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error_of(&json), "the image is not a JPEG or PNG");
    }

    #[actix_web::test]
    async fn bodies_over_the_limit_get_413_on_every_route() {
        let big = vec![0u8; LIMIT + 1];
        let form = multipart_body(&[file("image", &big)]);
        for req in [upload(&content_type(), form), raw(Some("image/jpeg"), &big)] {
            let (status, json) = call(req).await;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
        }
        // Without a declared length: counted as it arrives.
        for (uri, content_type) in [
            (PREDICT_UPLOAD, content_type()),
            (PREDICT_RAW, "image/png".to_string()),
        ] {
            let req = TestRequest::post()
                .uri(uri)
                .insert_header((header::CONTENT_TYPE, content_type));
            let chunks = (0..3).map(|_| Ok(Bytes::from(vec![0u8; LIMIT / 2])));
            let payload = Payload::from(stream::iter(chunks).boxed_local());
            let (status, json) = call_with(&state(), req, Some(payload)).await;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{uri}: {json}");
        }
    }

    #[actix_web::test]
    async fn new_routes_take_only_post_and_are_counted_by_route() {
        for uri in [PREDICT_UPLOAD, PREDICT_RAW] {
            let (status, json) = call(TestRequest::get().uri(uri)).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(error_of(&json), "method not allowed");
        }
        let state = state();
        call_with(&state, raw(Some("image/jpeg"), PHOTO), None).await;
        call_with(&state, raw(None, PHOTO), None).await;
        let text = state.metrics.render();
        for expected in [
            r#"bentoml_service_request_total{endpoint="/predict/raw",http_response_code="200""#,
            r#"bentoml_service_request_total{endpoint="/predict/raw",http_response_code="415""#,
            r#"bentoml_service_request_total{endpoint="/predict/upload",http_response_code="200""#,
        ] {
            assert!(text.contains(expected), "{expected}\n{text}");
        }
    }

    #[test]
    fn prediction_serializes_all_labels_in_order() {
        let labels: Vec<String> = ["dew", "fogsmog", "frost"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let probabilities = [0.25f32, 0.5, 0.25];
        let prediction = Prediction::new(&labels, &probabilities).expect("valid");
        let json = serde_json::to_string(&prediction).expect("serializes");
        assert_eq!(
            json,
            r#"{"prediction":"fogsmog","probability":0.5,"probabilities":{"dew":0.25,"fogsmog":0.5,"frost":0.25}}"#
        );
        assert!(Prediction::new(&labels, &[0.5, f32::NAN, 0.5]).is_err());
        assert!(Prediction::new(&labels, &[1.0]).is_err());
    }

    fn json_request(body: impl Into<Bytes>) -> TestRequest {
        TestRequest::post().uri(PREDICT).set_payload(body.into())
    }

    fn photo_json() -> String {
        serde_json::json!({ "image": base64_simd::STANDARD.encode_to_string(PHOTO) }).to_string()
    }

    /// A body that sends `first` and then nothing, ever.
    fn stalled(first: Vec<u8>) -> Payload {
        let chunks = stream::once(async move { Ok(Bytes::from(first)) }).chain(stream::pending());
        Payload::from(chunks.boxed_local())
    }

    /// Waits, without blocking the test's runtime, until `done`.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            actix_web::rt::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[actix_web::test]
    async fn a_request_beyond_the_places_and_the_line_gets_503_at_its_headers_unparsed() {
        let state = state_with(Inferencer::fake(Batching::OFF), LIMITS, 1, 1 << 20);
        let held = state.admission.try_admit().expect("the one place");
        let far = Instant::now() + Duration::from_secs(600);
        let mut waiting = Box::pin(state.admission.admit(far, |_| true));
        assert!((&mut waiting).now_or_never().is_none(), "the one in line");
        // Not even JSON: had it been parsed, it would be a 400.
        let (status, headers, json) = call_full(&state, json_request("not json"), None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
        assert_eq!(error_of(&json), "the server is overloaded; retry later");
        assert_eq!(
            headers.get(header::RETRY_AFTER).map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        drop((waiting, held));
        let (status, json) = call_with(&state, json_request(photo_json()), None).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert_eq!(state.admission.held(), 0, "every place given back");
        assert_eq!(state.admission.pending_bytes(), 0);
    }

    #[actix_web::test]
    async fn a_request_without_a_place_waits_with_its_body_unread_until_one_frees() {
        let state = state_with(Inferencer::fake(Batching::OFF), LIMITS, 1, 1 << 20);
        let held = state.admission.try_admit().expect("the one place");
        let app = test::init_service(app(state.clone())).await;
        // A body that counts how often it is polled.
        let polls = Rc::new(Cell::new(0usize));
        let counted = {
            let polls = Rc::clone(&polls);
            let mut body = Some(Bytes::from_static(PHOTO));
            stream::poll_fn(move |_| {
                polls.set(polls.get() + 1);
                Poll::Ready(body.take().map(Ok::<_, PayloadError>))
            })
        };
        let mut req = TestRequest::post()
            .uri(PREDICT_RAW)
            .insert_header((header::CONTENT_TYPE, "image/jpeg"))
            .to_request();
        *req.payload() = Payload::from(counted.boxed_local());
        let second = test::call_service(&app, req);
        let first_ends = async {
            until("the second to wait", || state.admission.waiting() == 1).await;
            // Time to read its body, were it going to.
            actix_web::rt::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(polls.get(), 0, "its body is not read while it waits");
            assert_eq!(state.admission.pending_bytes(), 0, "nor reserved");
            drop(held);
        };
        let (second, ()) = futures_util::future::join(second, first_ends).await;
        assert_eq!(second.status(), StatusCode::OK);
        assert!(polls.get() > 0, "read once it had the place");
        assert_eq!(state.admission.waiting(), 0);
        assert_eq!(state.admission.held(), 0);
    }

    #[actix_web::test]
    async fn a_request_still_waiting_for_a_place_at_its_deadline_gets_503() {
        let limits = Limits {
            request_timeout: Duration::from_millis(200),
            answer_headroom: Duration::ZERO,
            ..LIMITS
        };
        let state = state_with(Inferencer::fake(Batching::OFF), limits, 1, 1 << 20);
        let _held = state.admission.try_admit().expect("the one place");
        let started = Instant::now();
        let (status, headers, json) = call_full(&state, raw(Some("image/jpeg"), PHOTO), None).await;
        let waited = started.elapsed();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
        assert_eq!(
            error_of(&json),
            "the request could not be answered within 0.2 s; retry later"
        );
        assert_eq!(
            headers.get(header::RETRY_AFTER).map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        assert!(waited >= Duration::from_millis(200), "after {waited:?}");
        assert!(waited < Duration::from_secs(5), "after {waited:?}");
        assert_eq!(state.admission.waiting(), 0);
        assert_eq!(state.admission.held(), 1, "only the place held all along");
    }

    #[actix_web::test]
    async fn retry_after_is_configured_and_on_every_503() {
        let limits = Limits {
            retry_after_seconds: 7,
            ..LIMITS
        };
        let state = state_with(Inferencer::fake(Batching::OFF), limits, 0, 1 << 20);
        let (status, headers, _) = call_full(&state, raw(Some("image/png"), PHOTO), None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            headers.get(header::RETRY_AFTER).map(|v| v.as_bytes()),
            Some(&b"7"[..])
        );
        state.ready.store(false, Ordering::Release);
        let (status, headers, json) =
            call_full(&state, TestRequest::get().uri("/readyz"), None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
        assert_eq!(
            headers.get(header::RETRY_AFTER).map(|v| v.as_bytes()),
            Some(&b"7"[..])
        );
        let (status, headers, _) = call_full(&state, TestRequest::get().uri("/nope"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(headers.get(header::RETRY_AFTER).is_none(), "only on 503s");
    }

    #[actix_web::test]
    async fn client_errors_at_the_headers_come_before_admission() {
        // A full service still tells a client its request is wrong, at once: such a request
        // does not wait for a place (it would get 503 after the 30 s request timeout).
        let state = state_with(Inferencer::fake(Batching::OFF), LIMITS, 1, 1 << 20);
        let _held = state.admission.try_admit().expect("the one place");
        let (status, _) = call_with(&state, raw(Some("text/plain"), PHOTO), None).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let (status, _) = call_with(&state, raw(Some("image/png"), &[0; LIMIT + 1]), None).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[actix_web::test]
    async fn content_lengths_from_2_pow_63_are_400() {
        for (length, expected) in [
            ("9223372036854775808", StatusCode::BAD_REQUEST), // 2^63
            ("18446744073709551615", StatusCode::BAD_REQUEST), // 2^64 - 1
            ("9223372036854775807", StatusCode::PAYLOAD_TOO_LARGE), // 2^63 - 1
        ] {
            let req = raw(Some("image/png"), b"").insert_header((header::CONTENT_LENGTH, length));
            let (status, json) = call(req).await;
            assert_eq!(status, expected, "{length}: {json}");
        }
        let req = raw(Some("image/png"), b"").insert_header((header::CONTENT_LENGTH, "1 << 63"));
        assert_eq!(
            error_of(&call(req).await.1),
            AppError::InvalidContentLength.to_string()
        );
    }

    #[actix_web::test]
    async fn bodies_arriving_over_the_budget_get_503() {
        let state = state_with(Inferencer::fake(Batching::OFF), LIMITS, 8, 1000);
        // Declared: refused at the headers.
        let (status, headers, json) =
            call_full(&state, raw(Some("image/png"), &[0; 1001]), None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
        assert_eq!(error_of(&json), AppError::TooManyBodiesArriving.to_string());
        assert!(headers.contains_key(header::RETRY_AFTER));
        // Chunked: refused once it outgrows the budget.
        let chunks = (0..3).map(|_| Ok(Bytes::from(vec![0u8; 400])));
        let payload = Payload::from(stream::iter(chunks).boxed_local());
        let req = TestRequest::post()
            .uri(PREDICT_RAW)
            .insert_header((header::CONTENT_TYPE, "image/png"));
        let (status, json) = call_with(&state, req, Some(payload)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
        assert_eq!(error_of(&json), AppError::TooManyBodiesArriving.to_string());
        // A body that is in gives its bytes back: two in a row each fit.
        for _ in 0..2 {
            let (status, _) = call_with(&state, raw(Some("image/png"), &[0; 900]), None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "read, then not an image");
        }
        assert_eq!(state.admission.pending_bytes(), 0);
        assert_eq!(state.admission.held(), 0);
    }

    #[actix_web::test]
    async fn a_body_that_stalls_gets_408_and_gives_its_place_back() {
        let limits = Limits {
            body_timeout: Duration::from_millis(200),
            ..LIMITS
        };
        let state = state_with(Inferencer::fake(Batching::OFF), limits, 8, 1 << 20);
        let req = TestRequest::post()
            .uri(PREDICT_RAW)
            .insert_header((header::CONTENT_TYPE, "image/png"));
        let started = Instant::now();
        let (status, json) = call_with(&state, req, Some(stalled(vec![0; 100]))).await;
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{json}");
        assert_eq!(
            error_of(&json),
            "the request body did not arrive within 0.2s of its headers"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(state.admission.held(), 0);
        assert_eq!(state.admission.pending_bytes(), 0);
    }

    #[actix_web::test]
    async fn a_refused_body_that_stalls_is_not_waited_for_past_the_body_timeout() {
        let limits = Limits {
            body_timeout: Duration::from_millis(200),
            ..LIMITS
        };
        let state = state_with(Inferencer::fake(Batching::OFF), limits, 0, 1 << 20);
        let req = TestRequest::post()
            .uri(PREDICT_RAW)
            .insert_header((header::CONTENT_TYPE, "image/png"));
        let started = Instant::now();
        let (status, _) = call_with(&state, req, Some(stalled(vec![0; 100]))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// Waits, without blocking the test's runtime, for the gated model to start an image.
    async fn started(started: &crossbeam_channel::Receiver<()>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while started.try_recv().is_err() {
            assert!(
                Instant::now() < deadline,
                "the model never started an image"
            );
            actix_web::rt::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[actix_web::test]
    async fn a_request_that_cannot_start_in_time_gets_503_and_is_not_run() {
        let (model, gate) = FakeModel::gated();
        let limits = Limits {
            request_timeout: Duration::from_millis(200),
            answer_headroom: Duration::ZERO,
            ..LIMITS
        };
        let inferencer = Inferencer::fake_with(model, Batching::OFF, limits.request_timeout);
        let state = state_with(inferencer, limits, 8, 1 << 20);
        let app = test::init_service(app(state.clone())).await;
        // The first request takes the worker and holds it past the second's deadline.
        let first = test::call_service(&app, raw(Some("image/jpeg"), PHOTO).to_request());
        let second = async {
            started(&gate.started).await;
            let response = test::call_service(&app, raw(Some("image/png"), PHOTO).to_request());
            let release = async {
                actix_web::rt::time::sleep(Duration::from_millis(400)).await;
                gate.proceed.send(()).expect("let the first through");
            };
            let (response, ()) = futures_util::future::join(response, release).await;
            response
        };
        let (first, second) = futures_util::future::join(first, second).await;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(second.headers().contains_key(header::RETRY_AFTER));
        let json: serde_json::Value =
            serde_json::from_slice(&test::read_body(second).await).expect("JSON");
        assert_eq!(
            error_of(&json),
            "the request could not be answered within 0.2 s; retry later"
        );
        assert!(gate.started.try_recv().is_err(), "the second never started");
        assert_eq!(state.admission.held(), 0);
    }
}
