//! The service's two error types: [`AppError`], what a request can fail with, and
//! [`StartupError`], what keeps the service from starting.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::image::ImageError;

/// Everything a request can fail with. `status()` is the one place that maps errors to
/// HTTP status codes; every error body is `{"error": "<Display text>"}`. Every 503 also
/// carries `Retry-After`, set for all routes by `http::retry_after` from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// actix-http refuses a Content-Length that is not a u64; this is one from 2^63 up,
    /// which the contract refuses too (it is what a signed 64-bit length can hold).
    #[error("Content-Length is not a decimal number below 2^63")]
    InvalidContentLength,
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("the request body did not arrive within {}s of its headers", .within.as_secs_f64())]
    BodyTimeout { within: Duration },
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
    /// `found` is the media type sent (parameters left out), None when there is none or it
    /// does not parse.
    #[error(
        "Content-Type is {}; this endpoint takes {expected}",
        .found.as_deref().unwrap_or("missing or not a media type")
    )]
    UnsupportedMediaType {
        found: Option<String>,
        expected: &'static str,
    },
    #[error("the multipart/form-data Content-Type has no boundary")]
    MissingBoundary,
    #[error("request body is not valid multipart/form-data: {0}")]
    InvalidMultipart(String),
    #[error("no part named `image`: send the file as `image` (curl -F image=@photo.jpg)")]
    NoImagePart,
    #[error("more than one part named `image`")]
    SeveralImageParts,
    /// The part's name as sent. The body must hold the image and nothing else.
    #[error("unexpected part `{0}`: send only the file, in a part named `image`")]
    UnexpectedPart(String),
    /// A form field with no filename. Its text is never used, not even as a URL to fetch.
    #[error(
        "`image` is a text field, not a file: send the file itself (curl -F image=@photo.jpg)"
    )]
    ImagePartNotAFile,
    /// The decoders' own error, whose text is the client's message as it is.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Admission: the service holds as many predict requests as it may, and as many more
    /// already wait for a place.
    #[error("the server is overloaded; retry later")]
    Overloaded,
    /// Admission: the bodies still arriving hold all the memory they may.
    #[error("too many request bodies are arriving at once; retry later")]
    TooManyBodiesArriving,
    /// The request could not be answered within the request timeout of its headers: no
    /// place freed in time, or the worker that took it could not have finished it in time.
    #[error("the request could not be answered within {} s; retry later", .within.as_secs_f64())]
    NotStarted { within: Duration },
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
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::InvalidContentLength
            | Self::BodyRead(_)
            | Self::InvalidJson(_)
            | Self::NotAnObject
            | Self::MissingImage
            | Self::ImageNotAString(_)
            | Self::InvalidBase64
            | Self::MissingBoundary
            | Self::InvalidMultipart(_)
            | Self::NoImagePart
            | Self::SeveralImageParts
            | Self::UnexpectedPart(_)
            | Self::ImagePartNotAFile
            // Every image the decoders refuse is the client's doing.
            | Self::Image(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Overloaded
            | Self::TooManyBodiesArriving
            | Self::NotStarted { .. }
            | Self::NotReady => StatusCode::SERVICE_UNAVAILABLE,
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
        HttpResponse::build(self.status()).json(ErrorBody { error: &message })
    }
}

/// What keeps the service from starting, with the path or the step that failed. `main`
/// logs it once and exits with status 1.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    // Finding the model (config.rs).
    #[error("neither BENTOML_HOME nor HOME is set; pass --model")]
    NoBentomlHome,
    #[error("no model at {}: neither model.yaml nor a readable `latest` file ({source})", .path.display())]
    NoModel { path: PathBuf, source: io::Error },
    #[error("{} is empty", .0.display())]
    EmptyLatest(PathBuf),

    // Reading it (model.rs).
    #[error("cannot read {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} does not exist", .0.display())]
    Missing(PathBuf),
    /// model.yaml is not BentoML's, or its metadata asks for a contract this service does
    /// not implement.
    #[error("{}: {reason}", .path.display())]
    ModelYaml { path: PathBuf, reason: String },

    // ONNX Runtime and the workers' sessions (main.rs, infer.rs).
    #[error("cannot load ONNX Runtime from {}: {source} (set ORT_DYLIB_PATH)", .path.display())]
    Runtime {
        path: PathBuf,
        source: ort::LoadDynamicError,
    },
    #[error("ONNX Runtime: {0}")]
    SessionOptions(ort::Error),
    #[error("cannot load {}: {source}", .path.display())]
    Session { path: PathBuf, source: ort::Error },
    #[error("model.onnx has no {kind} `{name}`")]
    MissingTensor { kind: &'static str, name: String },
    #[error("model.onnx {kind} `{name}` is {found}, the contract says {expected}")]
    TensorMismatch {
        kind: &'static str,
        name: String,
        found: String,
        expected: String,
    },
    #[error("warm-up inference failed: {0}")]
    WarmUp(ort::Error),
    #[error("model output `{output}` is not a probability distribution (sums to {total})")]
    NotADistribution { output: String, total: f32 },
    #[error("cannot start a worker thread: {0}")]
    SpawnWorker(io::Error),
    #[error("a worker thread exited during start-up")]
    WorkerExited,

    // Serving (main.rs).
    #[error("cannot listen on {host}:{port}: {source}")]
    Listen {
        host: IpAddr,
        port: u16,
        source: io::Error,
    },
    /// Not start-up as such, but it ends the process the same way.
    #[error("server failed: {0}")]
    Server(io::Error),
}

impl StartupError {
    /// For reading a file the service needs: `fs::read(&p).map_err(StartupError::read(&p))`.
    pub fn read(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Read {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;
    use actix_web::http::header;

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
            AppError::InvalidContentLength,
            AppError::BodyRead("reset".into()),
            AppError::InvalidJson("eof".into()),
            AppError::NotAnObject,
            AppError::MissingImage,
            AppError::ImageNotAString("a number"),
            AppError::InvalidBase64,
            AppError::MissingBoundary,
            AppError::InvalidMultipart("Multipart stream is incomplete".into()),
            AppError::NoImagePart,
            AppError::SeveralImageParts,
            AppError::UnexpectedPart("note".into()),
            AppError::ImagePartNotAFile,
            ImageError::NotAnImage.into(),
            ImageError::Corrupt("premature end".into()).into(),
            ImageError::TooManyPixels {
                pixels: 40_000_001,
                limit: 40_000_000,
            }
            .into(),
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
            (
                AppError::UnsupportedMediaType {
                    found: None,
                    expected: "image/png",
                },
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                AppError::BodyTimeout {
                    within: Duration::from_secs(30),
                },
                StatusCode::REQUEST_TIMEOUT,
            ),
            (AppError::Overloaded, StatusCode::SERVICE_UNAVAILABLE),
            (
                AppError::TooManyBodiesArriving,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                AppError::NotStarted {
                    within: Duration::from_secs(2),
                },
                StatusCode::SERVICE_UNAVAILABLE,
            ),
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
    fn image_errors_keep_their_texts() {
        for (err, expected) in [
            (ImageError::NotAnImage, "the image is not a JPEG or PNG"),
            (
                ImageError::Corrupt("JPEG: premature end of data".into()),
                "the image is truncated or corrupt: JPEG: premature end of data",
            ),
        ] {
            let (status, _, json) = body_of(&err.into());
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(json, serde_json::json!({ "error": expected }));
        }
    }

    #[test]
    fn startup_errors_say_which_path_and_step() {
        let not_found = || io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(
            StartupError::read(Path::new("/m/v/model.onnx"))(not_found()).to_string(),
            "cannot read /m/v/model.onnx: entity not found"
        );
        assert_eq!(
            StartupError::NoModel {
                path: PathBuf::from("/store/models/weather-onnx"),
                source: not_found(),
            }
            .to_string(),
            "no model at /store/models/weather-onnx: neither model.yaml nor a readable `latest` file (entity not found)"
        );
        assert_eq!(
            StartupError::TensorMismatch {
                kind: "input",
                name: "pixels".into(),
                found: "Float32".into(),
                expected: "uint8 [batch, 224, 224, 3]".into(),
            }
            .to_string(),
            "model.onnx input `pixels` is Float32, the contract says uint8 [batch, 224, 224, 3]"
        );
    }

    #[test]
    fn messages_say_what_is_wrong() {
        assert_eq!(
            AppError::from(ImageError::TooManyPixels {
                pixels: 50_000_000,
                limit: 40_000_000
            })
            .to_string(),
            "the image has 50000000 pixels, more than the limit of 40000000"
        );
        assert_eq!(
            AppError::BodyTooLarge { limit: 16_777_216 }.to_string(),
            "request body is larger than 16777216 bytes"
        );
        assert_eq!(
            AppError::NotStarted {
                within: Duration::from_millis(2500)
            }
            .to_string(),
            "the request could not be answered within 2.5 s; retry later"
        );
        assert_eq!(
            AppError::BodyTimeout {
                within: Duration::from_secs(30)
            }
            .to_string(),
            "the request body did not arrive within 30s of its headers"
        );
        assert_eq!(
            AppError::UnsupportedMediaType {
                found: Some("application/json".into()),
                expected: "multipart/form-data",
            }
            .to_string(),
            "Content-Type is application/json; this endpoint takes multipart/form-data"
        );
        assert_eq!(
            AppError::UnsupportedMediaType {
                found: None,
                expected: "image/jpeg",
            }
            .to_string(),
            "Content-Type is missing or not a media type; this endpoint takes image/jpeg"
        );
    }
}
