//! Text tables: columns padded to their widest cell, each cell in its own style.

use std::borrow::Cow;

use anstyle::Style;

use crate::style::{HEADER, paint, visible};

/// A cell's text (control characters escaped: see [`visible`]) and style; the padding is
/// computed on the text alone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cell {
    text: String,
    style: Style,
}

impl Cell {
    pub(crate) fn styled(text: impl Into<String>, style: Style) -> Self {
        let text = text.into();
        Self {
            text: match visible(&text) {
                Cow::Borrowed(_) => text,
                Cow::Owned(shown) => shown,
            },
            style,
        }
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Self::styled(text, Style::new())
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Self {
        Self::styled(text, Style::new())
    }
}

/// `rows` as lines, the first row being the column titles.
pub(crate) fn table_text<const N: usize>(titles: [&str; N], rows: &[[Cell; N]]) -> String {
    let mut widths = titles.map(|title| title.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.text.chars().count());
        }
    }
    let titles = titles.map(|title| Cell::styled(title, HEADER));
    let mut out = String::new();
    for row in std::iter::once(&titles).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(&paint(cell.style, &cell.text));
            let pad = width - cell.text.chars().count();
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
