//! The process's logger: one line per record on stderr, as text or JSON, with the record's
//! key-value fields.
//!
//! Nothing on the per-frame path logs. Connection open and close lines are at debug level. No
//! call site passes a token, a query string or a publish key: the fields are ids, shard numbers,
//! addresses, close codes and durations.

use std::io::Write;

/// How lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `TS LEVEL message key=value …`
    Text,
    /// `{"ts":…,"level":…,"msg":…,"key":"value",…}`
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            _ => Err(format!("invalid log format {s:?}: use text or json")),
        }
    }
}

struct Logger {
    level: log::LevelFilter,
    format: Format,
}

struct Fields<'a> {
    out: &'a mut String,
    json: bool,
}

impl<'kvs> log::kv::VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        if self.json {
            self.out.push(',');
            let mut k = Vec::new();
            crate::json::write_string(&mut k, key.as_str());
            self.out.push_str(&String::from_utf8_lossy(&k));
            self.out.push(':');
            match value.to_u64() {
                Some(n) => self.out.push_str(&n.to_string()),
                None => {
                    let mut v = Vec::new();
                    crate::json::write_string(&mut v, &value.to_string());
                    self.out.push_str(&String::from_utf8_lossy(&v));
                }
            }
        } else {
            self.out.push(' ');
            self.out.push_str(key.as_str());
            self.out.push('=');
            self.out.push_str(&value.to_string());
        }
        Ok(())
    }
}

/// Formats one record (without the trailing newline).
pub fn format_record(format: Format, ts: &str, record: &log::Record<'_>) -> String {
    let mut line = String::with_capacity(128);
    match format {
        Format::Text => {
            line.push_str(ts);
            line.push(' ');
            line.push_str(&format!("{:5} {}", record.level(), record.args()));
        }
        Format::Json => {
            let mut msg = Vec::new();
            crate::json::write_string(&mut msg, &record.args().to_string());
            line.push_str(&format!(
                "{{\"ts\":\"{ts}\",\"level\":\"{}\",\"msg\":{}",
                record.level().as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(&msg)
            ));
        }
    }
    let _ = record.key_values().visit(&mut Fields {
        out: &mut line,
        json: format == Format::Json,
    });
    if format == Format::Json {
        line.push('}');
    }
    line
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ts = crate::clock::format_ts(crate::clock::now_ms());
        let line = format_record(self.format, std::str::from_utf8(&ts).unwrap_or(""), record);
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }

    fn flush(&self) {}
}

/// Installs the logger for the process (once; later calls are ignored).
pub fn init(level: log::LevelFilter, format: Format) {
    let logger: &'static Logger = Box::leak(Box::new(Logger { level, format }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_fields() {
        let args = format_args!("connection closed");
        let kvs: &[(&str, log::kv::Value<'_>)] =
            &[("shard", 1u64.into()), ("workspace", "ws \"1\"".into())];
        let record = log::Record::builder()
            .level(log::Level::Debug)
            .args(args)
            .key_values(&kvs)
            .build();
        let line = format_record(Format::Json, "2026-01-01T00:00:00.000Z", &record);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "debug");
        assert_eq!(v["msg"], "connection closed");
        assert_eq!(v["shard"], 1);
        assert_eq!(v["workspace"], "ws \"1\"");
        let text = format_record(Format::Text, "T", &record);
        assert_eq!(text, "T DEBUG connection closed shard=1 workspace=ws \"1\"");
    }
}
