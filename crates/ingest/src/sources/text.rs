//! Delimited text tables (CSV, RecBole atomic files) read row by row, with errors that name
//! file, row and column.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use features::error::{Error, Result};

/// The dialect of a text table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// Comma separated, optionally quoted, header names used as they are.
    Csv,
    /// RecBole atomic file: tab separated, never quoted, headers typed as `name:type`.
    RecBole,
}

/// An open table whose header has been read.
pub(crate) struct TextTable {
    path: PathBuf,
    dialect: Dialect,
    headers: Vec<String>,
    reader: csv::Reader<File>,
}

impl TextTable {
    pub(crate) fn open(path: &Path, dialect: Dialect) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(if dialect == Dialect::RecBole {
                b'\t'
            } else {
                b','
            })
            .quoting(dialect == Dialect::Csv)
            .flexible(true)
            .from_reader(file);
        let raw = reader
            .byte_headers()
            .map_err(|e| csv_error(path, 0, e))?
            .clone();
        if raw.is_empty() || (raw.len() == 1 && raw[0].is_empty()) {
            return Err(Error::bad_file(path, "no rows (the file is empty)"));
        }
        let mut headers = Vec::with_capacity(raw.len());
        for h in &raw {
            let h = std::str::from_utf8(h)
                .map_err(|_| Error::bad_file(path, "header row is not UTF-8"))?;
            let h = h.trim().trim_start_matches('\u{feff}');
            let name = match dialect {
                Dialect::RecBole => h.split(':').next().unwrap_or(h),
                Dialect::Csv => h,
            };
            if !name.is_empty() && headers.iter().any(|h| h == name) {
                // Which copy holds the data is anyone's guess.
                return Err(Error::bad_column(path, name, "appears twice in the header"));
            }
            headers.push(name.to_string());
        }
        Ok(TextTable {
            path: path.to_path_buf(),
            dialect,
            headers,
            reader,
        })
    }

    /// Index of an optional column.
    pub(crate) fn optional(&self, name: &str) -> Option<usize> {
        self.headers.iter().position(|h| h == name)
    }

    /// Index of a required column.
    pub(crate) fn column(&self, name: &str) -> Result<usize> {
        self.optional(name).ok_or_else(|| {
            Error::bad_column(
                &self.path,
                name,
                format!("missing (the header has: {})", self.headers.join(", ")),
            )
        })
    }

    /// Calls `f` with every data row (numbered from 1), or with the error that makes a row
    /// unreadable (wrong number of fields), so the caller can fail or skip. Returns the number
    /// of data rows.
    pub(crate) fn for_each_row(
        mut self,
        mut f: impl FnMut(Result<Row<'_>>) -> Result<()>,
    ) -> Result<usize> {
        let mut record = csv::ByteRecord::new();
        let mut n = 0;
        let mut last_start = None;
        // Rows with a field that spans lines: how many, and the first (row, line, column).
        let (mut multiline_rows, mut first_multiline) = (0usize, None);
        loop {
            match self.reader.read_byte_record(&mut record) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => return Err(csv_error(&self.path, n + 1, e)),
            }
            n += 1;
            last_start = record.position().cloned();
            if self.dialect == Dialect::Csv {
                if let Some(col) = multiline_field(&record) {
                    multiline_rows += 1;
                    let line = record.position().map_or(0, |p| p.line());
                    first_multiline.get_or_insert((n, line, col));
                }
            }
            let row = Row {
                file: &self.path,
                n,
                record: &record,
                headers: &self.headers,
            };
            if record.len() != self.headers.len() {
                let column = self
                    .headers
                    .get(record.len())
                    .map_or("(extra field)", |s| s.as_str());
                let reason = format!(
                    "expected {} fields, found {}",
                    self.headers.len(),
                    record.len()
                );
                f(Err(Error::bad_value(&self.path, n, column, reason)))?;
            } else {
                f(Ok(row))?;
            }
        }
        if n == 0 {
            return Err(Error::bad_file(&self.path, "no rows"));
        }
        if let (Dialect::Csv, Some(start)) = (self.dialect, last_start) {
            check_last_quote_closed(&self.path, n, &start)?;
        }
        if let Some((row, line, col)) = first_multiline {
            let column = self.headers.get(col).map_or("?", |s| s.as_str());
            tracing::warn!(
                file = %self.path.display(),
                rows = multiline_rows,
                "rows with a quoted field that spans lines: {multiline_rows}, the first at row {row} \
                 (line {line}, column `{column}`); if a closing `\"` is missing there, the lines \
                 up to the next quote were read as that one field, not as rows"
            );
        }
        Ok(n)
    }
}

/// The first field of `record` that holds a line break: legal inside quotes, and also what a
/// missing closing quote in the middle of a file looks like (the lines up to the next quote
/// become one field), which no parse error reveals.
fn multiline_field(record: &csv::ByteRecord) -> Option<usize> {
    record
        .iter()
        .position(|f| f.iter().any(|&b| b == b'\n' || b == b'\r'))
}

/// Refuses a file whose last row opens a quoted field that is never closed. A CSV reader takes
/// everything after such a quote, newlines and all, as that one field, so a single missing `"`
/// would silently turn the rest of the file into one title or query. Only the last row can end
/// that way (an unclosed quote runs to the end of the file), so only its bytes are scanned.
fn check_last_quote_closed(path: &Path, row: usize, start: &csv::Position) -> Result<()> {
    use std::io::{BufRead, BufReader, Seek, SeekFrom};
    let io = |e| Error::io(path, e);
    let mut file = File::open(path).map_err(io)?;
    file.seek(SeekFrom::Start(start.byte())).map_err(io)?;
    let mut reader = BufReader::new(file);
    // With CRLF line ends the reader ends a record at `\r` and counts the `\n` into the next
    // one, whose position then names the line before it.
    let line = start.line() + u64::from(reader.fill_buf().map_err(io)?.first() == Some(&b'\n'));
    let (mut in_quotes, mut field_start, mut quote_pending) = (false, true, false);
    loop {
        let buf = reader.fill_buf().map_err(io)?;
        if buf.is_empty() {
            break;
        }
        for &b in buf {
            if in_quotes {
                // `""` inside quotes is an escaped quote; a lone `"` closes the field.
                if !quote_pending {
                    quote_pending = b == b'"';
                    continue;
                }
                quote_pending = false;
                if b == b'"' {
                    continue;
                }
                // The quote before this byte closed the field; the byte is read as outside.
            }
            in_quotes = b == b'"' && field_start;
            field_start = matches!(b, b',' | b'\n' | b'\r');
        }
        let used = buf.len();
        reader.consume(used);
    }
    if in_quotes && !quote_pending {
        return Err(Error::bad_file(
            path,
            format!(
                "row {row} (line {}): a quoted field is never closed (a missing `\"`), so every \
                 line after it would be read as part of this row",
                line
            ),
        ));
    }
    Ok(())
}

fn csv_error(path: &Path, row: usize, e: csv::Error) -> Error {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => Error::io(path, e),
        other => Error::bad_file(path, format!("row {row}: unreadable: {other:?}")),
    }
}

/// One data row.
pub(crate) struct Row<'a> {
    file: &'a Path,
    /// 1-based data row number.
    pub(crate) n: usize,
    record: &'a csv::ByteRecord,
    headers: &'a [String],
}

impl Row<'_> {
    /// An error about column `col` of this row.
    pub(crate) fn error(&self, col: usize, reason: impl Into<String>) -> Error {
        Error::bad_value(self.file, self.n, &self.headers[col], reason)
    }

    /// The trimmed cell; `None` when empty.
    pub(crate) fn opt(&self, col: usize) -> Result<Option<&str>> {
        let bytes = self.record.get(col).unwrap_or_default();
        let s = std::str::from_utf8(bytes)
            .map_err(|_| self.error(col, "not valid UTF-8"))?
            .trim();
        Ok((!s.is_empty()).then_some(s))
    }

    /// The trimmed, non-empty cell.
    pub(crate) fn req(&self, col: usize) -> Result<&str> {
        self.opt(col)?
            .ok_or_else(|| self.error(col, "missing value"))
    }

    /// A non-negative integer id.
    pub(crate) fn id(&self, col: usize) -> Result<u64> {
        let s = self.req(col)?;
        s.parse().map_err(|_| {
            self.error(
                col,
                format!("expected a non-negative integer id, found `{s}`"),
            )
        })
    }

    /// A finite number, or `None` when empty.
    pub(crate) fn opt_number<T: FromStr + Into<f64> + Copy>(
        &self,
        col: usize,
    ) -> Result<Option<T>> {
        let Some(s) = self.opt(col)? else {
            return Ok(None);
        };
        match s.parse::<T>() {
            Ok(v) if v.into().is_finite() => Ok(Some(v)),
            _ => Err(self.error(col, format!("expected a number, found `{s}`"))),
        }
    }

    /// A Unix time in (possibly fractional) seconds, as milliseconds.
    pub(crate) fn unix_seconds_ms(&self, col: usize) -> Result<i64> {
        let s = self.req(col)?;
        let ms = match s.parse::<i64>() {
            Ok(secs) => secs.checked_mul(1000),
            Err(_) => s
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && v.abs() < 9e15)
                .map(|v| (v * 1000.0).round() as i64),
        };
        ms.ok_or_else(|| self.error(col, format!("expected a Unix time in seconds, found `{s}`")))
    }

    /// A time as integer milliseconds since the epoch or an RFC 3339 / ISO 8601 date-time
    /// (UTC when it has no offset); `None` when empty. Times before 1970 or after the year 9999
    /// are refused ([`features::records::check_time_ms`]).
    pub(crate) fn opt_time_ms(&self, col: usize) -> Result<Option<i64>> {
        let Some(s) = self.opt(col)? else {
            return Ok(None);
        };
        match features::records::parse_time_ms(s) {
            Some(ms) => features::records::check_time_ms(ms)
                .map(|()| Some(ms))
                .map_err(|reason| self.error(col, reason)),
            None => Err(self.error(
                col,
                format!("expected milliseconds since the Unix epoch or an RFC 3339 date-time, found `{s}`"),
            )),
        }
    }

    /// An error about the column named `column` of this row.
    pub(crate) fn error_at(&self, column: &str, reason: impl Into<String>) -> Error {
        Error::bad_value(self.file, self.n, column, reason)
    }

    /// A `|`-separated list; empty parts are dropped.
    pub(crate) fn list(&self, col: usize) -> Result<Vec<String>> {
        Ok(self.opt(col)?.map(split_list).unwrap_or_default())
    }
}

/// Splits a `|`-separated list cell, trimming parts and dropping empty ones.
pub(crate) fn split_list(s: &str) -> Vec<String> {
    s.split('|')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// Splits `"Toy Story (1995)"` into `("Toy Story", Some(1995))`; titles without a trailing
/// four-digit year in parentheses come back trimmed and unchanged.
pub(crate) fn split_title_year(title: &str) -> (&str, Option<u16>) {
    let t = title.trim();
    if let Some(open) = t
        .strip_suffix(')')
        .and_then(|s| s.rfind('(').map(|i| (s, i)))
    {
        let (s, i) = open;
        let digits = &s[i + 1..];
        if digits.len() == 4 && digits.bytes().all(|b| b.is_ascii_digit()) {
            let rest = s[..i].trim_end();
            if !rest.is_empty() {
                return (rest, digits.parse().ok());
            }
        }
    }
    (t, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The titles of `items.csv` holding `body`, or the error.
    fn titles(body: &str) -> Result<Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items.csv");
        std::fs::write(&path, body).unwrap();
        let table = TextTable::open(&path, Dialect::Csv)?;
        let title = table.column("title")?;
        let mut out = Vec::new();
        table.for_each_row(|row| {
            out.push(row?.req(title)?.to_string());
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn an_unclosed_quote_does_not_swallow_the_rest_of_the_file() {
        let err = titles("item_id,title\n1,Red hat\n2,\"Green scarf\n3,Yellow sock\n4,Tie\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("items.csv")
                && err.contains("row 2 (line 3)")
                && err.contains("never closed"),
            "{err}"
        );
        // Without a newline after the last row too, and with CRLF line ends.
        assert!(titles("item_id,title\n1,\"Red hat").is_err());
        let err = titles("item_id,title\r\n1,Red hat\r\n2,\"Green scarf\r\n3,Sock\r\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 2 (line 3)"), "{err}");
    }

    #[test]
    fn an_unclosed_quote_in_the_middle_of_a_file_is_found_as_a_field_that_spans_lines() {
        // The quote opened in row 2 closes in row 4, swallowing row 3: a legal parse.
        let body = "item_id,title\n1,Red hat\n2,\"Green scarf\n3,Yellow sock\n4,Tie\" x\n5,Cap\n";
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(body.as_bytes());
        let spans: Vec<Option<usize>> = reader
            .byte_records()
            .map(|r| multiline_field(&r.unwrap()))
            .collect();
        assert_eq!(spans, vec![None, Some(1), None]);
        // The rows still read (a warning names the first such row), and quoted commas or
        // quotes on one line are not taken for line breaks.
        assert_eq!(titles(body).unwrap().len(), 3);
        let one_line = "item_id,title\n1,\"Hat, red\"\n2,\"Say \"\"hi\"\"\"\n";
        let mut reader = csv::Reader::from_reader(one_line.as_bytes());
        assert!(reader
            .byte_records()
            .all(|r| multiline_field(&r.unwrap()).is_none()));
    }

    #[test]
    fn a_column_named_twice_in_the_header_is_refused() {
        let err = titles("item_id,title,title\n1,Hat,Cap\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`title`") && err.contains("twice"), "{err}");
        // Trailing commas (a spreadsheet export) are unnamed columns, not a repeated one.
        assert_eq!(titles("item_id,title,,\n1,Hat,,\n").unwrap(), ["Hat"]);
    }

    #[test]
    fn closed_quotes_escaped_quotes_and_quotes_inside_a_field_are_read() {
        let body = "item_id,title\n1,\"Hat, red\"\n2,\"Two\nlines\"\n3,\"A \"\"quoted\"\" word\"\n4,12\" pizza\n5,\"Last\"";
        assert_eq!(
            titles(body).unwrap(),
            [
                "Hat, red",
                "Two\nlines",
                "A \"quoted\" word",
                "12\" pizza",
                "Last"
            ]
        );
    }

    #[test]
    fn title_years_are_split_off_only_when_they_are_years() {
        assert_eq!(
            split_title_year("Toy Story (1995) "),
            ("Toy Story", Some(1995))
        );
        assert_eq!(
            split_title_year("Seven (Se7en) (1995)"),
            ("Seven (Se7en)", Some(1995))
        );
        assert_eq!(
            split_title_year("Fawlty Towers (1975-1979)"),
            ("Fawlty Towers (1975-1979)", None)
        );
        assert_eq!(split_title_year("Hyena Road"), ("Hyena Road", None));
        assert_eq!(split_title_year("(1995)"), ("(1995)", None));
    }
}
