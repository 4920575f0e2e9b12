//! The model directory: `model.onnx` plus BentoML's `model.yaml`, whose `metadata` holds
//! the labels and the input contract (written by `weather/contract.py`). The service reads
//! both from there and refuses to start on a contract it does not implement.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::StartupError;
use crate::image::{CROP_SIZE, SHORTER_SIDE};

pub const EXPECTED_LABELS: usize = 11;

/// What the service needs to know about the model, validated.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub dir: PathBuf,
    pub onnx_path: PathBuf,
    pub name: String,
    pub version: String,
    pub labels: Vec<String>,
    pub input_name: String,
    pub probabilities_name: String,
}

#[derive(Debug, Deserialize)]
struct ModelYaml {
    name: Option<String>,
    version: Option<String>,
    metadata: Option<Metadata>,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    labels: Option<Vec<String>>,
    input_contract: Option<InputContract>,
}

#[derive(Debug, Deserialize)]
struct InputContract {
    version: Option<i64>,
    input: Option<TensorSpec>,
    #[serde(default)]
    outputs: BTreeMap<String, TensorSpec>,
    before_graph: Option<BeforeGraph>,
}

#[derive(Debug, Deserialize)]
struct TensorSpec {
    name: Option<String>,
    dtype: Option<String>,
    layout: Option<String>,
    #[serde(default)]
    shape: Vec<Dim>,
    color: Option<String>,
}

/// A shape entry: a fixed size, or a symbolic name such as `batch`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum Dim {
    Size(i64),
    Symbol(String),
}

#[derive(Debug, Deserialize)]
struct BeforeGraph {
    resize: Option<Resize>,
    center_crop: Option<CenterCrop>,
}

#[derive(Debug, Deserialize)]
struct Resize {
    shorter_side: Option<i64>,
    filter: Option<String>,
    antialias: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct CenterCrop {
    height: Option<i64>,
    width: Option<i64>,
}

pub const PROBABILITIES: &str = "probabilities";
pub const LOGITS: &str = "logits";

impl ModelSpec {
    pub fn load(dir: &Path) -> Result<Self, StartupError> {
        let yaml_path = dir.join("model.yaml");
        let text = std::fs::read_to_string(&yaml_path).map_err(StartupError::read(&yaml_path))?;
        let onnx_path = dir.join("model.onnx");
        if !onnx_path.is_file() {
            return Err(StartupError::Missing(onnx_path));
        }
        let fallback_version = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_yaml(&text, dir, onnx_path, &fallback_version).map_err(|reason| {
            StartupError::ModelYaml {
                path: yaml_path,
                reason,
            }
        })
    }

    /// The bytes of `model.onnx`, for building sessions from memory.
    pub fn read_onnx(&self) -> Result<Vec<u8>, StartupError> {
        std::fs::read(&self.onnx_path).map_err(StartupError::read(&self.onnx_path))
    }

    fn from_yaml(
        text: &str,
        dir: &Path,
        onnx_path: PathBuf,
        fallback_version: &str,
    ) -> Result<Self, String> {
        let yaml: ModelYaml = serde_norway::from_str(text)
            .map_err(|err| format!("not a BentoML model.yaml: {err}"))?;
        let metadata = yaml.metadata.ok_or("has no `metadata`")?;
        let labels = metadata.labels.ok_or("metadata has no `labels`")?;
        validate_labels(&labels)?;
        let contract = metadata
            .input_contract
            .ok_or("metadata has no `input_contract`")?;
        let (input_name, probabilities_name) = validate_contract(&contract, labels.len())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            onnx_path,
            name: yaml.name.unwrap_or_else(|| "weather-onnx".into()),
            version: yaml
                .version
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| fallback_version.to_string()),
            labels,
            input_name,
            probabilities_name,
        })
    }
}

fn validate_labels(labels: &[String]) -> Result<(), String> {
    if labels.len() != EXPECTED_LABELS {
        return Err(format!(
            "metadata.labels has {} labels, this service serves a {EXPECTED_LABELS}-class model",
            labels.len()
        ));
    }
    if let Some(empty) = labels.iter().position(|l| l.trim().is_empty()) {
        return Err(format!("metadata.labels[{empty}] is empty"));
    }
    for (i, label) in labels.iter().enumerate() {
        if labels[..i].contains(label) {
            return Err(format!("metadata.labels has {label:?} twice"));
        }
    }
    Ok(())
}

fn expect_eq<T: PartialEq + std::fmt::Debug>(
    field: &str,
    found: Option<T>,
    supported: T,
) -> Result<(), String> {
    match found {
        Some(v) if v == supported => Ok(()),
        Some(v) => Err(format!(
            "metadata.input_contract.{field} is {v:?}, this service supports {supported:?}"
        )),
        None => Err(format!("metadata.input_contract.{field} is missing")),
    }
}

fn is_batch(dim: &Dim) -> bool {
    matches!(dim, Dim::Symbol(_) | Dim::Size(-1) | Dim::Size(1))
}

/// Returns the input and probabilities tensor names.
fn validate_contract(
    contract: &InputContract,
    num_labels: usize,
) -> Result<(String, String), String> {
    expect_eq("version", contract.version, 1)?;
    let input = contract
        .input
        .as_ref()
        .ok_or("metadata.input_contract.input is missing")?;
    let input_name = input
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("metadata.input_contract.input.name is missing")?;
    expect_eq("input.dtype", input.dtype.as_deref(), "uint8")?;
    expect_eq("input.layout", input.layout.as_deref(), "NHWC")?;
    if let Some(color) = input.color.as_deref() {
        expect_eq("input.color", Some(color), "RGB")?;
    }
    let crop = CROP_SIZE as i64;
    let shape_ok = input.shape.len() == 4
        && is_batch(&input.shape[0])
        && input.shape[1..] == [Dim::Size(crop), Dim::Size(crop), Dim::Size(3)];
    if !shape_ok {
        return Err(format!(
            "metadata.input_contract.input.shape is {:?}, this service supports [batch, {crop}, {crop}, 3]",
            input.shape
        ));
    }
    for name in [LOGITS, PROBABILITIES] {
        let output = contract
            .outputs
            .get(name)
            .ok_or_else(|| format!("metadata.input_contract.outputs has no `{name}`"))?;
        expect_eq(
            &format!("outputs.{name}.dtype"),
            output.dtype.as_deref(),
            "float32",
        )?;
        let shape_ok = output.shape.len() == 2
            && is_batch(&output.shape[0])
            && output.shape[1] == Dim::Size(num_labels as i64);
        if !shape_ok {
            return Err(format!(
                "metadata.input_contract.outputs.{name}.shape is {:?}, expected [batch, {num_labels}]",
                output.shape
            ));
        }
    }
    // What happens before the graph is this service's code; refuse a contract that asks
    // for something else.
    let before = contract
        .before_graph
        .as_ref()
        .ok_or("metadata.input_contract.before_graph is missing")?;
    let resize = before
        .resize
        .as_ref()
        .ok_or("metadata.input_contract.before_graph.resize is missing")?;
    expect_eq(
        "before_graph.resize.shorter_side",
        resize.shorter_side,
        SHORTER_SIDE as i64,
    )?;
    expect_eq(
        "before_graph.resize.filter",
        resize.filter.as_deref(),
        "bilinear",
    )?;
    expect_eq("before_graph.resize.antialias", resize.antialias, true)?;
    let center_crop = before
        .center_crop
        .as_ref()
        .ok_or("metadata.input_contract.before_graph.center_crop is missing")?;
    expect_eq("before_graph.center_crop.height", center_crop.height, crop)?;
    expect_eq("before_graph.center_crop.width", center_crop.width, crop)?;
    Ok((input_name, PROBABILITIES.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: weather-onnx
version: abc123
module: ''
metadata:
  labels: [dew, fogsmog, frost, glaze, hail, lightning, rain, rainbow, rime, sandstorm, snow]
  input_contract:
    version: 1
    input: {name: pixels, dtype: uint8, layout: NHWC, shape: [batch, 224, 224, 3], color: RGB}
    outputs:
      logits: {dtype: float32, shape: [batch, 11]}
      probabilities: {dtype: float32, shape: [batch, 11]}
    before_graph:
      convert: RGB
      resize: {shorter_side: 256, longer_side: "floor(shorter_side * long / short)", filter: bilinear, antialias: true}
      center_crop: {height: 224, width: 224, top: x, left: y}
    in_graph: {cast: float32, scale: 0.00392156862745098}
"#;

    fn parse(text: &str) -> Result<ModelSpec, String> {
        ModelSpec::from_yaml(
            text,
            Path::new("/m/v"),
            PathBuf::from("/m/v/model.onnx"),
            "v",
        )
    }

    #[test]
    fn reads_labels_and_contract() {
        let spec = parse(GOOD).expect("valid");
        assert_eq!(spec.labels.len(), 11);
        assert_eq!(spec.labels[0], "dew");
        assert_eq!(spec.labels[10], "snow");
        assert_eq!(spec.version, "abc123");
        assert_eq!(spec.input_name, "pixels");
        assert_eq!(spec.probabilities_name, "probabilities");
    }

    #[test]
    fn version_falls_back_to_directory_name() {
        let spec = parse(&GOOD.replace("version: abc123\n", "")).expect("valid");
        assert_eq!(spec.version, "v");
    }

    #[test]
    fn refuses_contracts_it_does_not_implement() {
        let cases = [
            ("dtype: uint8", "dtype: float32", "input.dtype"),
            ("layout: NHWC", "layout: NCHW", "input.layout"),
            (
                "[batch, 224, 224, 3]",
                "[batch, 3, 224, 224]",
                "input.shape",
            ),
            ("shorter_side: 256", "shorter_side: 232", "shorter_side"),
            ("filter: bilinear", "filter: bicubic", "filter"),
            ("antialias: true", "antialias: false", "antialias"),
            ("height: 224", "height: 240", "center_crop.height"),
            ("probabilities: {", "probs: {", "no `probabilities`"),
            ("snow]", "snow, fog]", "12 labels"),
            ("rime, sandstorm", "rime, rime", "twice"),
            ("version: 1\n", "version: 2\n", "input_contract.version"),
        ];
        for (from, to, expected) in cases {
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(text, GOOD, "{from} not found");
            let err = parse(&text).expect_err(to);
            assert!(err.contains(expected), "{to}: {err}");
            assert!(!err.contains('\n'), "one-line error: {err}");
        }
    }

    #[test]
    fn refuses_missing_metadata() {
        assert!(parse("name: x\n").unwrap_err().contains("metadata"));
        assert!(parse("metadata: {labels: [a]}\n")
            .unwrap_err()
            .contains("labels"));
        assert!(parse(": not yaml [").is_err());
    }
}
