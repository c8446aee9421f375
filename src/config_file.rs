//! `--config FILE`: every server flag may also come from a TOML file, with the precedence
//! flag > environment > file > default.
//!
//! Keys are the flag names without the dashes (`max-connections = 5000`; `max_connections` is
//! accepted too). A key that names no flag is an error that gives its line, so a typo never
//! silently leaves a default in force. The file is applied by turning each of its keys into
//! command-line arguments for the flags that neither the command line nor the environment set.

use clap::parser::ValueSource;
use clap::ArgMatches;

/// Why a configuration file was refused. The message names the file, the line and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFileError(pub String);

impl std::fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The line (1-based) on which `key` is assigned in `text`, for error messages.
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
                || l.starts_with(&format!("\"{key}\""))
        })
        .map_or(0, |i| i + 1)
}

/// Extra arguments for the flags the file sets and `matches` left at their defaults.
///
/// `flags` lists the server's flag ids (`max_connections`, …) with whether each takes a value.
pub fn arguments(
    path: &str,
    text: &str,
    matches: &ArgMatches,
    flags: &[(String, bool)],
) -> Result<Vec<String>, ConfigFileError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
            .unwrap_or(0);
        ConfigFileError(format!("{path}:{at}: {}", e.message()))
    })?;
    let mut args = Vec::new();
    for (key, value) in &table {
        let id = key.replace('-', "_");
        let Some((_, takes_value)) = flags.iter().find(|(f, _)| *f == id) else {
            return Err(ConfigFileError(format!(
                "{path}:{}: unknown key {key:?}",
                line_of(text, key)
            )));
        };
        if matches.value_source(&id) != Some(ValueSource::DefaultValue)
            && matches.value_source(&id).is_some()
        {
            continue; // the command line or the environment wins
        }
        let flag = format!("--{}", id.replace('_', "-"));
        let scalar = |v: &toml::Value| -> Result<String, ConfigFileError> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                _ => Err(ConfigFileError(format!(
                    "{path}:{}: {key} must be a string, number or boolean",
                    line_of(text, key)
                ))),
            }
        };
        match (value, takes_value) {
            (toml::Value::Boolean(true), false) => args.push(flag),
            (toml::Value::Boolean(false), false) => {}
            (_, false) => {
                return Err(ConfigFileError(format!(
                    "{path}:{}: {key} takes true or false",
                    line_of(text, key)
                )));
            }
            (toml::Value::Array(items), true) => {
                for item in items {
                    args.push(flag.clone());
                    args.push(scalar(item)?);
                }
            }
            (v, true) => {
                args.push(flag);
                args.push(scalar(v)?);
            }
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_name_their_line() {
        let text = "listen = \"127.0.0.1:1\"\n\nmax-conections = 5\n";
        let m = clap::Command::new("t")
            .arg(clap::Arg::new("listen").long("listen"))
            .get_matches_from(["t"]);
        let err = arguments("f.toml", text, &m, &[("listen".into(), true)]).unwrap_err();
        assert_eq!(err.0, "f.toml:3: unknown key \"max-conections\"");
    }

    #[test]
    fn syntax_errors_name_their_line() {
        let m = clap::Command::new("t").get_matches_from(["t"]);
        let err = arguments("f.toml", "a = 1\nb = = 2\n", &m, &[]).unwrap_err();
        assert!(err.0.starts_with("f.toml:2:"), "{}", err.0);
    }
}
