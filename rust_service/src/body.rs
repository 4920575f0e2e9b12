//! Request bodies → the image's bytes, for the three ways a client sends an image
//! (docs/contract.md): JSON with the file in base64 (`/predict`), a multipart/form-data
//! upload (`/predict/upload`) and the file itself (`/predict/raw`).
//!
//! What can be decided from the headers (the `Content-Type`, a declared length over the
//! limit) is decided before the body is read ([`check_headers`]). Every body is then read
//! whole under one size limit and one deadline, the whole multipart body included
//! ([`read`]); a refused one is read and thrown away ([`discard`]).

use std::borrow::Cow;
use std::error::Error as _;
use std::fmt;
use std::time::{Duration, Instant};

use actix_multipart::{Multipart, MultipartError};
use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use actix_web::http::header::{self, HeaderMap};
use actix_web::mime::{self, Mime};
use actix_web::web::{Bytes, BytesMut};
use futures_util::{future, stream, StreamExt};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::error::AppError;

/// The multipart part that holds the image file.
pub const IMAGE_PART: &str = "image";

/// The media types `/predict/raw` accepts. The bytes decide the format, so a PNG sent as
/// `image/jpeg` is fine.
pub const RAW_MEDIA_TYPES: [&str; 3] = ["image/jpeg", "image/png", "application/octet-stream"];

/// What an endpoint takes as its body, which decides the `Content-Type` it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `{"image": "<base64>"}`, whatever the `Content-Type`, so that existing clients,
    /// which may send none or any, keep working.
    Json,
    /// `multipart/form-data` with a boundary.
    Multipart,
    /// The image file itself, as one of [`RAW_MEDIA_TYPES`].
    ImageFile,
}

impl BodyKind {
    /// Checks the request's `Content-Type` for this kind of body: 415 for a media type the
    /// endpoint does not take, 400 for a multipart one without a boundary.
    pub fn check(self, headers: &HeaderMap) -> Result<(), AppError> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        match self {
            Self::Json => Ok(()),
            Self::Multipart => check_multipart(content_type),
            Self::ImageFile => check_image_file(content_type),
        }
    }
}

/// Parsed with the `mime` crate, as actix-multipart parses it to find the boundary: type,
/// subtype and parameter names come out lowercase.
fn check_multipart(content_type: Option<&str>) -> Result<(), AppError> {
    let media_type: Option<Mime> = content_type.and_then(|v| v.parse().ok());
    let media_type = match media_type {
        Some(m) if m.type_() == mime::MULTIPART && m.subtype() == mime::FORM_DATA => m,
        other => {
            return Err(AppError::UnsupportedMediaType {
                found: other.map(|m| m.essence_str().to_owned()),
                expected: "multipart/form-data",
            })
        }
    };
    match media_type.get_param(mime::BOUNDARY) {
        Some(boundary) if !boundary.as_str().is_empty() => Ok(()),
        _ => Err(AppError::MissingBoundary),
    }
}

/// Only the type/subtype counts, in any case; parameters are ignored, even malformed ones.
fn check_image_file(content_type: Option<&str>) -> Result<(), AppError> {
    let essence = content_type
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .filter(|essence| !essence.is_empty());
    match essence {
        Some(essence)
            if RAW_MEDIA_TYPES
                .iter()
                .any(|t| t.eq_ignore_ascii_case(essence)) =>
        {
            Ok(())
        }
        other => Err(AppError::UnsupportedMediaType {
            found: other.map(str::to_ascii_lowercase),
            expected: "image/jpeg, image/png or application/octet-stream",
        }),
    }
}

/// What the headers alone decide for an endpoint that takes `kind`, before any of the body
/// is read: 415 or 400 for the `Content-Type`; 400 for a `Content-Length` from 2^63 up
/// (actix-http refuses one that is not a number below 2^64 itself); 413 for one over
/// `max_body_bytes`. Returns the declared length, None for a chunked body.
pub fn check_headers(
    headers: &HeaderMap,
    kind: BodyKind,
    max_body_bytes: usize,
) -> Result<Option<usize>, AppError> {
    kind.check(headers)?;
    let Some(value) = headers.get(header::CONTENT_LENGTH) else {
        return Ok(None);
    };
    let declared = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&len| len < 1 << 63)
        .ok_or(AppError::InvalidContentLength)?;
    match usize::try_from(declared) {
        Ok(len) if len <= max_body_bytes => Ok(Some(len)),
        _ => Err(AppError::BodyTooLarge {
            limit: max_body_bytes,
        }),
    }
}

/// Reads a whole body of at most `max_body_bytes` that must be in `body_timeout` after
/// `headers_at`.
///
/// `declared` is its Content-Length, already checked against the limit and reserved by the
/// caller; a chunked body (None) is reserved as it arrives: `reserve` is called with the
/// size of each chunk and refuses it by returning false.
///
/// On an error the rest of the body is left in `payload` for the caller to discard (see
/// [`discard`]), except after [`AppError::BodyTimeout`] (a client that slow is not waited
/// for any longer) and [`AppError::BodyRead`] (the connection is broken).
pub async fn read(
    payload: &mut Payload,
    declared: Option<usize>,
    max_body_bytes: usize,
    (headers_at, body_timeout): (Instant, Duration),
    mut reserve: impl FnMut(usize) -> bool,
) -> Result<BytesMut, AppError> {
    let reading = async {
        // A declared length is allocated at once (the budget already counts it); a chunked
        // body grows as it comes.
        let mut body = BytesMut::with_capacity(declared.unwrap_or(64 * 1024));
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|err| AppError::BodyRead(payload_error(err)))?;
            if body.len() + chunk.len() > max_body_bytes {
                return Err(AppError::BodyTooLarge {
                    limit: max_body_bytes,
                });
            }
            if declared.is_none() && !reserve(chunk.len()) {
                return Err(AppError::TooManyBodiesArriving);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout_at((headers_at + body_timeout).into(), reading)
        .await
        .unwrap_or(Err(AppError::BodyTimeout {
            within: body_timeout,
        }))
}

/// What went wrong reading the body, for the client. actix-http reports a malformed
/// chunked body (a bad chunk size, one over 2^64, a missing CRLF) as the body ending early.
fn payload_error(err: PayloadError) -> String {
    match err {
        PayloadError::Incomplete(None) => {
            "the body ended early, or its chunked encoding is malformed".into()
        }
        other => other.to_string(),
    }
}

/// Reads and throws away what is left of a refused body, up to `limit` bytes and until
/// `deadline`, so that a client that writes its whole body before reading its answer does
/// read it. Nothing is kept. True when the body was read to its end: only then can the
/// connection serve another request.
pub async fn discard(payload: &mut Payload, limit: usize, deadline: Instant) -> bool {
    let draining = async {
        let mut discarded = 0usize;
        while let Some(chunk) = payload.next().await {
            match chunk {
                Ok(chunk) => discarded = discarded.saturating_add(chunk.len()),
                Err(_) => return false,
            }
            if discarded > limit {
                return false;
            }
        }
        true
    };
    tokio::time::timeout_at(deadline.into(), draining)
        .await
        .unwrap_or(false)
}

/// The file of a multipart/form-data body read whole (see [`read`]), which must hold one
/// part, a file named `image`, and nothing else; `headers` are the request's, which hold
/// the boundary.
pub async fn image_from_multipart(headers: &HeaderMap, body: Bytes) -> Result<Vec<u8>, AppError> {
    let mut parts = Multipart::new(headers, stream::once(future::ready(Ok(body))));
    let mut image = None;
    while let Some(part) = parts.next().await {
        let mut part = part.map_err(invalid_multipart)?;
        match part.name() {
            Some(IMAGE_PART) if image.is_some() => return Err(AppError::SeveralImageParts),
            Some(IMAGE_PART) => {}
            // The parser refuses a form-data part without a name, so `None` is not expected.
            other => return Err(AppError::UnexpectedPart(other.unwrap_or_default().into())),
        }
        // A file part has a filename (possibly empty, or only in the RFC 5987 `filename*`
        // form); a part without one is a text field.
        let is_file = part
            .content_disposition()
            .is_some_and(|cd| cd.get_filename().is_some() || cd.get_filename_ext().is_some());
        if !is_file {
            return Err(AppError::ImagePartNotAFile);
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = part.next().await {
            bytes.extend_from_slice(&chunk.map_err(invalid_multipart)?);
        }
        image = Some(bytes);
    }
    image.ok_or(AppError::NoImagePart)
}

/// actix-multipart's errors keep the detail (e.g. which header is malformed) in `source()`.
fn invalid_multipart(err: MultipartError) -> AppError {
    AppError::InvalidMultipart(match err.source() {
        Some(source) => format!("{err}: {source}"),
        None => err.to_string(),
    })
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

/// Builds multipart/form-data bodies for tests, here and in http.rs.
#[cfg(test)]
pub(crate) mod test_support {
    pub const BOUNDARY: &str = "XyZ-boundary-1234";

    /// `Content-Type: multipart/form-data; boundary=BOUNDARY`.
    pub fn content_type() -> String {
        format!("multipart/form-data; boundary={BOUNDARY}")
    }

    /// A file part named `name`.
    pub fn file<'a>(name: &str, content: &'a [u8]) -> (String, &'a [u8]) {
        (format!("name=\"{name}\"; filename=\"photo.jpg\""), content)
    }

    /// A text field named `name`.
    pub fn field<'a>(name: &str, content: &'a [u8]) -> (String, &'a [u8]) {
        (format!("name=\"{name}\""), content)
    }

    /// The body holding `parts`: each its `Content-Disposition` parameters (after
    /// `form-data; `) and its content.
    pub fn body(parts: &[(String, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (disposition, content) in parts {
            body.extend_from_slice(
                format!(
                    "--{BOUNDARY}\r\nContent-Disposition: form-data; {disposition}\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            );
            body.extend_from_slice(content);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        body
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{body as multipart_body, content_type, field, file};
    use super::*;
    use actix_web::http::header::HeaderValue;

    fn headers(content_type: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = content_type {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        headers
    }

    fn check(kind: BodyKind, content_type: Option<&str>) -> Result<(), AppError> {
        kind.check(&headers(content_type))
    }

    #[test]
    fn json_takes_any_content_type() {
        for content_type in [
            None,
            Some("application/json"),
            Some("text/plain"),
            Some("x"),
        ] {
            assert!(
                check(BodyKind::Json, content_type).is_ok(),
                "{content_type:?}"
            );
        }
    }

    #[test]
    fn raw_takes_the_three_media_types_ignoring_case_and_parameters() {
        for ok in [
            "image/jpeg",
            "image/png",
            "application/octet-stream",
            "IMAGE/JPEG",
            "Image/Png; charset=binary",
            "application/octet-stream ; name=\"photo.jpg\"",
            " image/png;;; oops",
        ] {
            assert!(check(BodyKind::ImageFile, Some(ok)).is_ok(), "{ok}");
        }
    }

    #[test]
    fn raw_refuses_other_media_types_with_415() {
        for (content_type, found) in [
            (None, None),
            (Some(""), None),
            (Some("image"), Some("image")),
            (Some("; charset=utf-8"), None),
            (Some("image/gif"), Some("image/gif")),
            (Some("application/json"), Some("application/json")),
            (
                Some("multipart/form-data; boundary=x"),
                Some("multipart/form-data"),
            ),
            (Some("Text/Plain; charset=utf-8"), Some("text/plain")),
        ] {
            match check(BodyKind::ImageFile, content_type) {
                Err(AppError::UnsupportedMediaType { found: got, .. }) => {
                    assert_eq!(got.as_deref(), found, "{content_type:?}")
                }
                other => panic!("{content_type:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn upload_needs_multipart_form_data_with_a_boundary() {
        for ok in [
            "multipart/form-data; boundary=abc",
            "Multipart/Form-Data; BOUNDARY=\"a b\"",
            "multipart/form-data; charset=utf-8; boundary=abc",
        ] {
            assert!(check(BodyKind::Multipart, Some(ok)).is_ok(), "{ok}");
        }
        for unsupported in [
            None,
            Some("application/json"),
            Some("multipart/mixed; boundary=abc"),
            Some("application/x-www-form-urlencoded"),
            Some("not a type"),
        ] {
            assert!(
                matches!(
                    check(BodyKind::Multipart, unsupported),
                    Err(AppError::UnsupportedMediaType { .. })
                ),
                "{unsupported:?}"
            );
        }
        for no_boundary in ["multipart/form-data", "multipart/form-data; charset=utf-8"] {
            assert!(
                matches!(
                    check(BodyKind::Multipart, Some(no_boundary)),
                    Err(AppError::MissingBoundary)
                ),
                "{no_boundary}"
            );
        }
    }

    async fn upload(body: Vec<u8>) -> Result<Vec<u8>, AppError> {
        image_from_multipart(&headers(Some(&content_type())), body.into()).await
    }

    #[actix_web::test]
    async fn takes_the_image_part() {
        let image = b"\xFF\xD8\xFF\xE0 not really a jpeg \r\n--almost a boundary\r\n";
        let body = multipart_body(&[file("image", image)]);
        assert_eq!(upload(body).await.expect("valid"), image);
    }

    #[actix_web::test]
    async fn an_empty_file_is_passed_on_for_the_decoder_to_refuse() {
        let body = multipart_body(&[file("image", b"")]);
        assert_eq!(upload(body).await.expect("valid"), b"");
    }

    #[actix_web::test]
    async fn a_filename_in_rfc_5987_form_marks_a_file() {
        let body = multipart_body(&[(
            "name=\"image\"; filename*=UTF-8''ph%C3%B6to.jpg".to_string(),
            b"bytes".as_slice(),
        )]);
        assert_eq!(upload(body).await.expect("valid"), b"bytes");
    }

    #[actix_web::test]
    async fn part_errors_are_specific() {
        assert!(matches!(
            upload(multipart_body(&[])).await,
            Err(AppError::NoImagePart)
        ));
        // Any part but the image, before or after it, file or text.
        for parts in [
            vec![file("photo", b"bytes")],
            vec![field("note", b"hello"), file("image", b"bytes")],
            vec![file("image", b"bytes"), file("thumbnail", b"more")],
            vec![
                file("image", b"bytes"),
                field("url", b"http://example.com/a.jpg"),
            ],
        ] {
            match upload(multipart_body(&parts)).await {
                Err(AppError::UnexpectedPart(name)) => assert_ne!(name, "image"),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            upload(multipart_body(&[file("image", b"a"), file("image", b"b")])).await,
            Err(AppError::SeveralImageParts)
        ));
        // A text field, even one holding a URL, is not the image.
        assert!(matches!(
            upload(multipart_body(&[field(
                "image",
                b"https://example.com/a.jpg"
            )]))
            .await,
            Err(AppError::ImagePartNotAFile)
        ));
        // Field names are case-sensitive.
        assert!(matches!(
            upload(multipart_body(&[file("Image", b"bytes")])).await,
            Err(AppError::UnexpectedPart(_))
        ));
    }

    #[actix_web::test]
    async fn malformed_bodies_are_invalid_multipart() {
        let good = multipart_body(&[file("image", b"bytes")]);
        let truncated = good[..good.len() - 30].to_vec();
        let no_disposition = format!(
            "--{b}\r\nContent-Type: image/png\r\n\r\nbytes\r\n--{b}--\r\n",
            b = test_support::BOUNDARY
        );
        for (what, body) in [
            ("empty", Vec::new()),
            ("not multipart", b"just some bytes".to_vec()),
            ("truncated", truncated),
            ("no Content-Disposition", no_disposition.into_bytes()),
        ] {
            match upload(body).await {
                Err(AppError::InvalidMultipart(message)) => assert!(!message.is_empty()),
                other => panic!("{what}: {other:?}"),
            }
        }
    }

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

    fn headers_with(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(name.clone(), HeaderValue::from_str(value).expect("value"));
        }
        headers
    }

    #[test]
    fn headers_decide_the_media_type_and_the_declared_length() {
        let check = |pairs: &[(header::HeaderName, &str)]| {
            check_headers(&headers_with(pairs), BodyKind::ImageFile, 1000)
        };
        let png = (header::CONTENT_TYPE, "image/png");
        assert!(
            matches!(check(std::slice::from_ref(&png)), Ok(None)),
            "chunked"
        );
        assert!(matches!(
            check(&[png.clone(), (header::CONTENT_LENGTH, "1000")]),
            Ok(Some(1000))
        ));
        assert!(matches!(
            check(&[png.clone(), (header::CONTENT_LENGTH, "1001")]),
            Err(AppError::BodyTooLarge { limit: 1000 })
        ));
        for invalid in ["9223372036854775808", "18446744073709551615", "-1", "x"] {
            assert!(
                matches!(
                    check(&[png.clone(), (header::CONTENT_LENGTH, invalid)]),
                    Err(AppError::InvalidContentLength)
                ),
                "{invalid}"
            );
        }
        // The media type first: a wrong one is 415 whatever the length.
        assert!(matches!(
            check(&[(header::CONTENT_LENGTH, "5000")]),
            Err(AppError::UnsupportedMediaType { .. })
        ));
    }

    fn chunks(sizes: &[usize]) -> Payload {
        let chunks: Vec<Result<Bytes, actix_web::error::PayloadError>> = sizes
            .iter()
            .map(|&size| Ok(Bytes::from(vec![7u8; size])))
            .collect();
        Payload::from(stream::iter(chunks).boxed_local())
    }

    const LONG: Duration = Duration::from_secs(60);

    async fn read_all(
        payload: &mut Payload,
        declared: Option<usize>,
        max: usize,
        reserve: impl FnMut(usize) -> bool,
    ) -> Result<BytesMut, AppError> {
        read(payload, declared, max, (Instant::now(), LONG), reserve).await
    }

    #[actix_web::test]
    async fn read_reserves_a_chunked_body_as_it_arrives() {
        let mut reserved = Vec::new();
        let body = read_all(&mut chunks(&[3, 4, 5]), None, 100, |n| {
            reserved.push(n);
            true
        })
        .await
        .expect("fits");
        assert_eq!(body.len(), 12);
        assert_eq!(reserved, [3, 4, 5]);
        // A declared length was reserved at the headers: nothing more.
        let body = read_all(&mut chunks(&[3, 4]), Some(7), 100, |_| panic!("reserved"))
            .await
            .expect("fits");
        assert_eq!(body.len(), 7);
    }

    #[actix_web::test]
    async fn read_stops_at_the_limits_and_leaves_the_rest() {
        let mut payload = chunks(&[60, 60, 60]);
        let err = read_all(&mut payload, None, 100, |_| true).await;
        assert!(matches!(err, Err(AppError::BodyTooLarge { limit: 100 })));
        assert_eq!(payload.next().await.expect("left").expect("ok").len(), 60);

        let mut payload = chunks(&[60, 60, 60]);
        let mut budget = 100usize;
        let err = read_all(&mut payload, None, 1000, |n| {
            budget.checked_sub(n).map(|left| budget = left).is_some()
        })
        .await;
        assert!(matches!(err, Err(AppError::TooManyBodiesArriving)));
        assert_eq!(payload.next().await.expect("left").expect("ok").len(), 60);
    }

    #[actix_web::test]
    async fn read_times_out_from_the_headers() {
        let pending =
            stream::once(async { Ok(Bytes::from_static(b"abc")) }).chain(stream::pending::<
                Result<Bytes, actix_web::error::PayloadError>,
            >());
        let mut payload = Payload::from(pending.boxed_local());
        let timeout = Duration::from_millis(300);
        // The headers came 200 ms ago: 100 ms are left.
        let headers_at = Instant::now() - Duration::from_millis(200);
        let started = Instant::now();
        let err = read(&mut payload, None, 100, (headers_at, timeout), |_| true).await;
        assert!(
            matches!(err, Err(AppError::BodyTimeout { within }) if within == timeout),
            "{err:?}"
        );
        let waited = started.elapsed();
        assert!(waited < Duration::from_millis(250), "waited {waited:?}");
    }

    #[actix_web::test]
    async fn discard_reads_to_the_end_within_the_limit_and_the_deadline() {
        let soon = || Instant::now() + Duration::from_secs(60);
        assert!(discard(&mut chunks(&[100, 100]), 200, soon()).await);
        assert!(discard(&mut chunks(&[]), 0, soon()).await);
        assert!(!discard(&mut chunks(&[100, 100, 1]), 200, soon()).await);
        let pending = stream::pending::<Result<Bytes, actix_web::error::PayloadError>>();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(100);
        assert!(!discard(&mut Payload::from(pending.boxed_local()), 200, deadline).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        let failing = stream::iter([Err(actix_web::error::PayloadError::Incomplete(None))]);
        assert!(!discard(&mut Payload::from(failing.boxed_local()), 200, soon()).await);
    }
}
