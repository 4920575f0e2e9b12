use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// Everything a request can fail with. `status()` is the one place that maps errors to
/// HTTP status codes; every error body is `{"error": "<Display text>"}`.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("`image` is missing")]
    MissingImage,
    #[error("`image` must be a string (base64 of a JPEG or PNG), got {0}")]
    ImageNotAString(&'static str),
    #[error("`image` is not valid standard base64")]
    InvalidBase64,
    #[error("the image is not a JPEG or PNG")]
    NotAnImage,
    #[error("the image is truncated or corrupt: {0}")]
    CorruptImage(String),
    #[error("the image has {pixels} pixels, more than the limit of {limit}")]
    TooManyPixels { pixels: u64, limit: u64 },
    #[error("the server is overloaded; retry later")]
    Overloaded,
    #[error("the model is not ready")]
    NotReady,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("inference failed: {0}")]
    Inference(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyRead(_)
            | Self::InvalidJson(_)
            | Self::NotAnObject
            | Self::MissingImage
            | Self::ImageNotAString(_)
            | Self::InvalidBase64
            | Self::NotAnImage
            | Self::CorruptImage(_)
            | Self::TooManyPixels { .. } => StatusCode::BAD_REQUEST,
            Self::Overloaded | Self::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Inference(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl ResponseError for AppError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }

    fn error_response(&self) -> HttpResponse {
        let message = self.to_string();
        let mut response = HttpResponse::build(self.status());
        if matches!(self, Self::Overloaded | Self::NotReady) {
            response.insert_header((header::RETRY_AFTER, "1"));
        }
        response.json(ErrorBody { error: &message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    fn body_of(err: &AppError) -> (StatusCode, Option<String>, serde_json::Value) {
        let response = err.error_response();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = response
            .into_body()
            .try_into_bytes()
            .expect("error bodies are in memory");
        let json = serde_json::from_slice(&bytes).expect("error body is JSON");
        (status, content_type, json)
    }

    #[test]
    fn client_errors_map_to_400() {
        for err in [
            AppError::BodyRead("reset".into()),
            AppError::InvalidJson("eof".into()),
            AppError::NotAnObject,
            AppError::MissingImage,
            AppError::ImageNotAString("a number"),
            AppError::InvalidBase64,
            AppError::NotAnImage,
            AppError::CorruptImage("premature end".into()),
            AppError::TooManyPixels {
                pixels: 40_000_001,
                limit: 40_000_000,
            },
        ] {
            let (status, content_type, json) = body_of(&err);
            assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
            assert_eq!(content_type.as_deref(), Some("application/json"));
            assert_eq!(json, serde_json::json!({ "error": err.to_string() }));
        }
    }

    #[test]
    fn other_errors_keep_their_status_and_json_body() {
        let cases = [
            (
                AppError::BodyTooLarge { limit: 16 },
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (AppError::Overloaded, StatusCode::SERVICE_UNAVAILABLE),
            (AppError::NotReady, StatusCode::SERVICE_UNAVAILABLE),
            (AppError::NotFound, StatusCode::NOT_FOUND),
            (AppError::MethodNotAllowed, StatusCode::METHOD_NOT_ALLOWED),
            (
                AppError::Inference("boom".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (err, expected) in cases {
            let (status, _, json) = body_of(&err);
            assert_eq!(status, expected, "{err}");
            assert!(json["error"].as_str().is_some_and(|s| !s.is_empty()));
        }
    }

    #[test]
    fn messages_say_what_is_wrong() {
        assert_eq!(
            AppError::TooManyPixels {
                pixels: 50_000_000,
                limit: 40_000_000
            }
            .to_string(),
            "the image has 50000000 pixels, more than the limit of 40000000"
        );
        assert_eq!(
            AppError::BodyTooLarge { limit: 16_777_216 }.to_string(),
            "request body is larger than 16777216 bytes"
        );
    }
}
