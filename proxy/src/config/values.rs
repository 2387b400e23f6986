//! Reading one value: the given variables with their declared defaults, and the
//! parsers for addresses, flags, sizes and durations shared by every topic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::variable::Variable;
use super::{invalid, ConfigError};

/// A value that does not parse (the caller names the variable or field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

pub(super) fn parse_addr(var: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        invalid(
            var,
            format!("'{s}' is not an IP address and port, e.g. 127.0.0.1:6432"),
        )
    })
}

pub(super) fn parse_bool(var: &'static str, s: &str) -> Result<bool, ConfigError> {
    match s {
        "true" | "on" | "1" | "yes" => Ok(true),
        "false" | "off" | "0" | "no" => Ok(false),
        _ => Err(invalid(var, format!("'{s}' is not true or false"))),
    }
}

/// Parses sizes: `65536`, `64kB`, `64MB`, `1GB` (powers of 1024).
pub fn parse_size(s: &str) -> Result<usize, InvalidValue> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| InvalidValue(format!("'{s}' is not a size like 64MB")))?;
    let mult = match unit {
        "" | "B" => 1,
        "kB" | "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => {
            return Err(InvalidValue(format!(
                "'{s}': the unit must be B, kB, MB or GB"
            )))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| InvalidValue(format!("'{s}' is too large")))
}

/// Parses `250ms`, `10s`, `1m`, `1h` (and `0`).
pub fn parse_duration(s: &str) -> Result<Duration, InvalidValue> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| InvalidValue(format!("'{s}' is not a duration like 250ms, 10s, 1m")))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(InvalidValue(format!(
                "'{s}' has no unit: write e.g. 250ms, 10s, 1m, 1h"
            )))
        }
    };
    Ok(d)
}

pub(super) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The `HANDOFF_*` variables given, and the declared defaults of the others: the one
/// place a default is read, so `--help` and the parser cannot disagree.
pub(super) struct Vars {
    pub(super) env: HashMap<String, String>,
    /// Every declared variable (the configuration's whole table).
    table: &'static [Variable],
}

impl Vars {
    /// Keeps the `HANDOFF_*` variables, refusing any not in `table`.
    pub(super) fn collect<I, K, V>(vars: I, table: &'static [Variable]) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut env = HashMap::new();
        for (k, v) in vars {
            let k = k.into();
            if !k.starts_with("HANDOFF_") {
                continue;
            }
            if !table.iter().any(|var| var.name == k) {
                return Err(ConfigError::Unknown(k));
            }
            env.insert(k, v.into());
        }
        Ok(Self { env, table })
    }

    /// The value given (trimmed, empty counts as not given).
    pub(super) fn given(&self, name: &'static str) -> Option<&str> {
        self.env
            .get(name)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
    }

    /// The value given, else the declared default; `None` for a variable left unset
    /// whose default is a description (written in parentheses).
    pub(super) fn get(&self, name: &'static str) -> Option<&str> {
        if let Some(v) = self.given(name) {
            return Some(v);
        }
        let var = self
            .table
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("{name} is read but not declared in VARIABLES"));
        (!var.default.starts_with('(')).then_some(var.default)
    }

    pub(super) fn duration(&self, name: &'static str) -> Result<Duration, ConfigError> {
        parse_duration(self.get(name).unwrap_or("0")).map_err(|r| invalid(name, r))
    }

    pub(super) fn positive_duration(&self, name: &'static str) -> Result<Duration, ConfigError> {
        let d = self.duration(name)?;
        if d.is_zero() {
            return Err(invalid(name, "must be greater than zero"));
        }
        Ok(d)
    }

    /// A duration where `0` means "not set" (`None`).
    pub(super) fn optional_duration(
        &self,
        name: &'static str,
    ) -> Result<Option<Duration>, ConfigError> {
        Ok(Some(self.duration(name)?).filter(|d| !d.is_zero()))
    }

    pub(super) fn at_least_1ms(&self, name: &'static str) -> Result<Duration, ConfigError> {
        let d = self.duration(name)?;
        if d < Duration::from_millis(1) {
            return Err(invalid(name, "must be at least 1ms"));
        }
        Ok(d)
    }

    /// A whole number of at least `min`.
    pub(super) fn count(&self, name: &'static str, min: usize) -> Result<usize, ConfigError> {
        let s = self.get(name).unwrap_or("0");
        s.parse::<usize>()
            .ok()
            .filter(|n| *n >= min)
            .ok_or_else(|| invalid(name, format!("'{s}' is not an integer of at least {min}")))
    }

    pub(super) fn size(&self, name: &'static str) -> Result<usize, ConfigError> {
        parse_size(self.get(name).unwrap_or("0")).map_err(|r| invalid(name, r))
    }

    pub(super) fn flag(&self, name: &'static str) -> Result<bool, ConfigError> {
        parse_bool(name, self.get(name).unwrap_or("false"))
    }

    /// One of `choices` (by name).
    pub(super) fn choice<T: Copy>(
        &self,
        name: &'static str,
        choices: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        let s = self.get(name).unwrap_or_default();
        choices
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                invalid(name, format!("'{s}' is not one of {}", names.join(", ")))
            })
    }
}
