//! Tests of the surgery: external data.

use tract_onnx::pb::{GraphProto, ModelProto, TensorProto, tensor_proto::DataType};

use super::*;
use tract_onnx::pb::StringStringEntryProto;

/// A model whose one initializer, FLOAT[dims], is stored in `w.bin` with these entries.
fn external(dims: Vec<i64>, entries: &[(&str, &str)]) -> ModelProto {
    ModelProto {
        graph: Some(GraphProto {
            initializer: vec![TensorProto {
                name: "w".into(),
                dims,
                data_type: DataType::Float as i32,
                data_location: Some(1),
                external_data: entries
                    .iter()
                    .map(|(k, v)| StringStringEntryProto {
                        key: k.to_string(),
                        value: v.to_string(),
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn external_data_is_checked_for_presence_size_and_declared_length() {
    let dir = std::env::temp_dir().join(format!("mcd-external-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("w.bin"), [0u8; 64]).unwrap();
    let check = |dims: Vec<i64>, entries: &[(&str, &str)]| {
        check_external_data(&external(dims, entries), &dir).map_err(|e| format!("{e:#}"))
    };
    assert!(check(vec![4, 4], &[("location", "w.bin")]).is_ok());
    assert!(check(vec![2, 4], &[("location", "w.bin"), ("offset", "32"), ("length", "32")]).is_ok());
    let err = check(vec![4, 4], &[("location", "w.bin"), ("offset", "4")]).unwrap_err();
    assert!(err.contains("truncated") && err.contains("4..68"), "{err}");
    let err = check(vec![4, 4], &[("location", "w.bin"), ("length", "60")]).unwrap_err();
    assert!(err.contains("declares 60 bytes"), "{err}");
    let err = check(vec![4, 4], &[("location", "other.bin")]).unwrap_err();
    assert!(err.contains("'other.bin'") && err.contains("cannot be read"), "{err}");
    let err = check(vec![4], &[("location", "w.bin"), ("offset", "-1")]).unwrap_err();
    assert!(err.contains("offset is not a number"), "{err}");
    assert!(check(vec![4], &[]).unwrap_err().contains("names no file"));
    for outside in ["/etc/hostname", "../w.bin"] {
        let err = check(vec![4], &[("location", outside)]).unwrap_err();
        assert!(err.contains("outside the model's folder"), "{err}");
    }
    // Dims whose byte size overflows: refused, never a panic.
    let huge = vec![i64::MAX, i64::MAX];
    let err = check(huge, &[("location", "w.bin"), ("length", "64")]).unwrap_err();
    assert!(err.contains("too large"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
