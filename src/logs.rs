//! The log subscriber: JSON lines, or text lines whose field values cannot break a line.
//!
//! Field values carry what clients send (a model name from a REST path or a gRPC
//! `model_name`, inside `error=`), percent-decoded and so able to hold a newline, NUL or a
//! terminal escape. The JSON format escapes them already; the text format writes values as
//! they are, so there every field value (span fields included) goes through [`Escaped`],
//! and one event stays one line whatever a client sent.

use std::fmt::{self, Write};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{Writer, debug_fn};

use crate::config::LogFormat;

/// Installs the process's subscriber (level from `RUST_LOG`, `info` by default, `warn` for
/// onnxruntime's own messages).
pub fn init(format: LogFormat) {
    // ONNX Runtime (the `ort` target) reports each arena it grows at info level, for every
    // pass that needs more memory: by default only its warnings reach the log.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,ort=warn"));
    match format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .fmt_fields(debug_fn(text_field).delimited(" "))
            .with_env_filter(filter)
            .init(),
    }
}

/// One field as the default text format writes it (`message` bare, others `name=value`,
/// strings quoted by their `Debug`), with control characters escaped.
fn text_field(writer: &mut Writer<'_>, field: &tracing::field::Field, value: &dyn fmt::Debug) -> fmt::Result {
    let mut out = Escaped(writer);
    if field.name() == "message" {
        write!(out, "{value:?}")
    } else {
        write!(out, "{}={value:?}", field.name())
    }
}

/// Writes through to `W`, with every control character (newline, CR, tab, NUL, ESC, ...)
/// and the Unicode line and paragraph separators written as an escape (`\n`, `\u{0}`).
pub struct Escaped<W>(pub W);

impl<W: Write> Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(needs_escape) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("find returned a char boundary");
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        Escaped(&mut out).write_str(s).unwrap();
        out
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escaped("a\nb\r\tc\0d\u{1b}[31m"), "a\\nb\\r\\tc\\u{0}d\\u{1b}[31m");
        assert_eq!(escaped("x\u{2028}y\u{85}"), "x\\u{2028}y\\u{85}");
    }

    #[test]
    fn other_text_is_unchanged() {
        for s in ["", "plain", "é ü ✓ 模型", "quote \" and \\ stay"] {
            assert_eq!(escaped(s), s);
        }
    }
}
