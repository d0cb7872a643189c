//! How commands print state: one `--output text|json|yaml` choice for every command that prints
//! state, and the aligned text tables they print by default.

use anyhow::Result;
use serde::Serialize;

/// The output format of a command that prints state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable text (tables, `key value` lines).
    #[default]
    Text,
    /// JSON, pretty-printed.
    Json,
    /// YAML.
    Yaml,
}

impl Format {
    /// `value` as JSON or YAML (ending in a newline); `None` for [`Format::Text`], whose shape is
    /// the command's own.
    pub fn render<T: Serialize + ?Sized>(self, value: &T) -> Result<Option<String>> {
        Ok(match self {
            Self::Text => None,
            Self::Json => Some(format!("{}\n", serde_json::to_string_pretty(value)?)),
            Self::Yaml => {
                let mut value = serde_json::to_value(value)?;
                value.sort_all_objects();
                Some(serde_saphyr::to_string(&value)?)
            }
        })
    }
}

/// Left-aligned columns, two spaces apart, one line per row under the header.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let cells: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", cells.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_formats_serialise() {
        let rows = [
            ["a".to_owned(), "long value".to_owned()],
            ["longer".to_owned(), String::new()],
        ];
        assert_eq!(
            table(&["K", "V"], &rows),
            "K       V\na       long value\nlonger\n"
        );
        let value = serde_json::json!({"b": 1, "a": [true]});
        assert_eq!(Format::Text.render(&value).unwrap(), None);
        assert_eq!(
            Format::Json.render(&value).unwrap().unwrap(),
            "{\n  \"a\": [\n    true\n  ],\n  \"b\": 1\n}\n"
        );
        assert_eq!(
            Format::Yaml.render(&value).unwrap().unwrap(),
            "a:\n- true\nb: 1\n"
        );
    }
}
