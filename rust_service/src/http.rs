//! Routes: POST /predict, /predict/upload, /predict/raw, GET /livez, /readyz, /metrics.
//! Every error, including a wrong path or method and an oversized body, is a JSON
//! `{"error": ...}` body.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::web;
use actix_web::{HttpRequest, HttpResponse};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

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
    pub max_body_bytes: usize,
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
    if let Some(m) = &metrics {
        m.start(&endpoint);
    }
    let result = next.call(req).await;
    let status = match &result {
        Ok(res) => res.status().as_u16(),
        Err(err) => err.as_response_error().status_code().as_u16(),
    };
    let seconds = started.elapsed().as_secs_f64();
    if let Some(m) = &metrics {
        m.finish(&endpoint, status, seconds);
    }
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

async fn predict(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let body = body::read(&req, payload, BodyKind::Json, state.max_body_bytes).await?;
    let image = body::parse_predict_request(&body)?;
    drop(body);
    answer(&state, image).await
}

async fn predict_upload(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let body = body::read(&req, payload, BodyKind::Multipart, state.max_body_bytes).await?;
    let image = body::image_from_multipart(req.headers(), body.freeze()).await?;
    answer(&state, image).await
}

async fn predict_raw(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let image = body::read(&req, payload, BodyKind::ImageFile, state.max_body_bytes).await?;
    answer(&state, image.into()).await
}

/// Where every predict route ends once it has the image's bytes, so that the same image
/// gets the same answer whichever way it came.
async fn answer(state: &AppState, image: Vec<u8>) -> Result<HttpResponse, AppError> {
    let probabilities = state.inferencer.predict(image).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::test_support::{body as multipart_body, content_type, field, file};
    use crate::infer::Batching;
    use actix_web::dev::Payload;
    use actix_web::http::StatusCode;
    use actix_web::middleware::from_fn;
    use actix_web::test::{self, TestRequest};
    use actix_web::web::Bytes;
    use actix_web::App;
    use futures_util::{stream, StreamExt};

    const PHOTO: &[u8] = include_bytes!("../tests/fixtures/rgb_420.jpg");
    const LIMIT: usize = 64 * 1024;

    /// The service as main.rs puts it together, on a model that needs no ONNX Runtime.
    fn state() -> web::Data<AppState> {
        web::Data::new(AppState {
            inferencer: Inferencer::fake(Batching::OFF),
            labels: ["red", "green", "blue"].map(String::from).into(),
            metrics: Arc::new(Metrics::new("test", "v1", &PREDICT_ROUTES)),
            ready: Arc::new(AtomicBool::new(true)),
            max_body_bytes: LIMIT,
        })
    }

    /// Sends `req` (with `streamed` as its body instead, if given: no Content-Length).
    async fn call_with(
        state: &web::Data<AppState>,
        req: TestRequest,
        streamed: Option<Payload>,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = req.to_request();
        if let Some(payload) = streamed {
            *req.payload() = payload;
        }
        let app = test::init_service(
            App::new()
                .app_data(state.clone())
                .wrap(from_fn(track))
                .configure(configure),
        )
        .await;
        let response = test::call_service(&app, req).await;
        let status = response.status();
        let body = test::read_body(response).await;
        let json = serde_json::from_slice(&body)
            .unwrap_or_else(|err| panic!("{status}: body is not JSON ({err}): {body:?}"));
        (status, json)
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
}
