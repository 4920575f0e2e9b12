//! Routes: POST /predict, GET /livez, /readyz, /metrics. Every error, including a wrong
//! path or method and an oversized body, is a JSON `{"error": ...}` body.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::web::{self, BytesMut};
use actix_web::{HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::error::AppError;
use crate::infer::Inferencer;
use crate::metrics::Metrics;

pub const PREDICT: &str = "/predict";

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
    let body = read_body(&req, payload, state.max_body_bytes).await?;
    let image = parse_predict_request(&body)?;
    drop(body);
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

/// How much of an oversized body is read and thrown away before answering 413, so that a
/// client still sending gets the 413 instead of a connection reset. Beyond this the
/// connection is closed.
const DRAIN_LIMIT: usize = 256 * 1024 * 1024;

/// Reads the body up to `limit` bytes. Over the limit (declared or actual) the rest is
/// drained and the answer is 413.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<BytesMut, AppError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = AppError::BodyTooLarge { limit };
    if declared.is_some_and(|len| len > limit) {
        // A client waiting for `100 Continue` has not sent the body: answer right away.
        if !req.headers().contains_key(header::EXPECT) {
            drain(payload).await;
        }
        return Err(too_large);
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(64 * 1024));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|err| AppError::BodyRead(err.to_string()))?;
        if body.len() + chunk.len() > limit {
            drain(payload).await;
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn drain(mut payload: web::Payload) {
    let mut drained = 0usize;
    while let Some(Ok(chunk)) = payload.next().await {
        drained += chunk.len();
        if drained > DRAIN_LIMIT {
            break;
        }
    }
}

/// `{"image": "<base64>"}` → the decoded bytes. Other keys are ignored.
pub fn parse_predict_request(body: &[u8]) -> Result<Vec<u8>, AppError> {
    let request: PredictRequest<'_> =
        serde_json::from_slice(body).map_err(|err| match err.classify() {
            serde_json::error::Category::Data => AppError::NotAnObject,
            _ => AppError::InvalidJson(err.to_string()),
        })?;
    let image = match request.image {
        ImageField::Missing => return Err(AppError::MissingImage),
        ImageField::Other(kind) => return Err(AppError::ImageNotAString(kind)),
        ImageField::Str(image) => image,
    };
    base64_simd::STANDARD
        .decode_to_vec(image.as_bytes())
        .map_err(|_| AppError::InvalidBase64)
}

struct PredictRequest<'a> {
    image: ImageField<'a>,
}

/// The `image` value as found, so a wrong type gets its own message.
enum ImageField<'a> {
    Missing,
    Str(Cow<'a, str>),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for PredictRequest<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = PredictRequest<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut image = ImageField::Missing;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "image" {
                        image = map.next_value()?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(PredictRequest { image })
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

impl<'de> Deserialize<'de> for ImageField<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AnyVisitor;
        impl<'de> Visitor<'de> for AnyVisitor {
            type Value = ImageField<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(ImageField::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ImageField::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(ImageField::Str(Cow::Owned(v)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(ImageField::Other("a boolean"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(ImageField::Other("a number"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(ImageField::Other("a number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(ImageField::Other("a number"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(ImageField::Other("null"))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(ImageField::Other("null"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ImageField::Other("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(ImageField::Other("an object"))
            }
        }
        deserializer.deserialize_any(AnyVisitor)
    }
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

    fn parse(body: &str) -> Result<Vec<u8>, AppError> {
        parse_predict_request(body.as_bytes())
    }

    #[test]
    fn parses_base64_image() {
        assert_eq!(parse(r#"{"image": "aGVsbG8="}"#).expect("valid"), b"hello");
        // Escaped slashes are valid JSON and still base64.
        assert_eq!(
            parse(r#"{"image": "\/w==", "other": [1, {"a": null}]}"#).expect("valid"),
            [0xFF]
        );
    }

    #[test]
    fn request_errors_are_specific() {
        assert!(matches!(parse("{"), Err(AppError::InvalidJson(_))));
        assert!(matches!(parse("not json"), Err(AppError::InvalidJson(_))));
        assert!(matches!(
            parse(r#"{"image": "aGVsbG8="} x"#),
            Err(AppError::InvalidJson(_))
        ));
        assert!(matches!(parse(""), Err(AppError::InvalidJson(_))));
        assert!(matches!(
            parse(r#"["aGVsbG8="]"#),
            Err(AppError::NotAnObject)
        ));
        assert!(matches!(parse(r#""aGVsbG8=""#), Err(AppError::NotAnObject)));
        assert!(matches!(parse("42"), Err(AppError::NotAnObject)));
        assert!(matches!(parse("{}"), Err(AppError::MissingImage)));
        assert!(matches!(
            parse(r#"{"img": "aGVsbG8="}"#),
            Err(AppError::MissingImage)
        ));
        assert!(matches!(
            parse(r#"{"image": 5}"#),
            Err(AppError::ImageNotAString("a number"))
        ));
        assert!(matches!(
            parse(r#"{"image": null}"#),
            Err(AppError::ImageNotAString("null"))
        ));
        assert!(matches!(
            parse(r#"{"image": ["a"]}"#),
            Err(AppError::ImageNotAString("an array"))
        ));
        assert!(matches!(
            parse(r#"{"image": {"b": 1}}"#),
            Err(AppError::ImageNotAString("an object"))
        ));
        assert!(matches!(
            parse(r#"{"image": true}"#),
            Err(AppError::ImageNotAString("a boolean"))
        ));
        // Not standard base64: bad characters, URL-safe alphabet, missing padding, spaces.
        for bad in ["not base64!", "-_-_", "aGVsbG8", "aGVs bG8=", "aGVsbG8=\n"] {
            let body = serde_json::json!({ "image": bad }).to_string();
            assert!(
                matches!(
                    parse_predict_request(body.as_bytes()),
                    Err(AppError::InvalidBase64)
                ),
                "{bad:?}"
            );
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
