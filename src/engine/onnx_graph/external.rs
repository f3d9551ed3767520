//! Weights in an external data file (`<file>.onnx.data`), read from beside the model.

use std::path::Path;

use std::collections::HashMap;

use anyhow::{Context, bail};
use tract_onnx::pb::{GraphProto, ModelProto, TensorProto, tensor_proto::DataType};

/// Weights stored outside the .onnx file (`<file>.onnx.data`, as PyTorch's exporter writes
/// for larger models) must sit in the model's folder, whole. Checked here so that a missing
/// or truncated file is refused with a reason that names it, before tract reads a byte.
pub fn check_external_data(proto: &ModelProto, dir: &Path) -> anyhow::Result<()> {
    fn tensors(g: &GraphProto) -> Vec<&TensorProto> {
        let mut out: Vec<&TensorProto> = g.initializer.iter().collect();
        for n in &g.node {
            for a in &n.attribute {
                out.extend(a.t.iter());
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    out.extend(tensors(sub));
                }
            }
        }
        out
    }
    let Some(graph) = &proto.graph else { return Ok(()) };
    let mut sizes: HashMap<String, u64> = HashMap::new();
    for t in tensors(graph) {
        if t.data_location != Some(1) {
            continue; // EXTERNAL is 1; the data is in the file itself
        }
        let entry = |key: &str| t.external_data.iter().find(|e| e.key == key).map(|e| e.value.as_str());
        let Some(location) = entry("location") else {
            bail!("tensor '{}' is stored outside the model file but names no file", t.name)
        };
        let number = |key: &str| -> anyhow::Result<Option<u64>> {
            entry(key)
                .map(|v| v.parse::<u64>())
                .transpose()
                .with_context(|| format!("tensor '{}': external data {key} is not a number", t.name))
        };
        // The data belongs to the model's folder: never read a file elsewhere.
        let relative = Path::new(location);
        if relative.is_absolute()
            || relative
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            bail!(
                "tensor '{}' is stored in '{location}', outside the model's folder; the server reads \
                 external data only from beside the model file",
                t.name
            );
        }
        let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
        let file = dir.join(location);
        let size = match sizes.get(location) {
            Some(s) => *s,
            None => {
                let s = std::fs::metadata(&file)
                    .with_context(|| {
                        format!(
                            "the weights of tensor '{}' are stored in '{location}', which must sit beside \
                             the model file in {}; it cannot be read",
                            t.name,
                            dir.display()
                        )
                    })?
                    .len();
                sizes.insert(location.to_string(), s);
                s
            }
        };
        let element_bytes = match DataType::try_from(t.data_type) {
            Ok(DataType::Float | DataType::Int32 | DataType::Uint32) => Some(4),
            Ok(DataType::Double | DataType::Int64 | DataType::Uint64) => Some(8),
            Ok(DataType::Float16 | DataType::Bfloat16 | DataType::Int16 | DataType::Uint16) => Some(2),
            Ok(DataType::Int8 | DataType::Uint8 | DataType::Bool) => Some(1),
            _ => None,
        };
        // Checked: a hostile file may declare dims whose byte size overflows.
        let needed = match element_bytes {
            None => None,
            Some(b) => Some(
                t.dims
                    .iter()
                    .try_fold(b, |acc: u64, &d| acc.checked_mul(u64::try_from(d).unwrap_or(0)))
                    .with_context(|| format!("tensor '{}' has shape {:?}, too large to hold", t.name, t.dims))?,
            ),
        };
        if let (Some(length), Some(needed)) = (length, needed)
            && length != needed
        {
            bail!(
                "tensor '{}' declares {length} bytes in '{location}', but its shape {:?} needs {needed}",
                t.name,
                t.dims
            );
        }
        let Some(length) = length.or(needed) else { continue };
        let end = offset.saturating_add(length);
        if end > size {
            bail!(
                "'{location}' (beside the model file) is truncated: it holds {size} bytes, and tensor \
                 '{}' needs bytes {offset}..{end}",
                t.name
            );
        }
    }
    Ok(())
}
