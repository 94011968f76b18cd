//! `secret:NAME[:FIELD]`: how env sinks and `mayfly-agent exec` name a granted secret's
//! value, parsed once. Secret names may contain `.` but never `:`, so the field after a
//! second colon is unambiguous.

use std::fmt;
use std::str::FromStr;

use crate::state::SecretView;

/// Which part of a secret's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretField {
    /// The value (the password, for a database credential).
    Value,
    /// The user it belongs to (alternating-users secrets change it on every rotation).
    Username,
    /// The version id.
    Version,
}

/// A reference to one field of a granted secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub name: String,
    pub field: SecretField,
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretRefError {
    #[error(
        "`{0}` is not a secret reference: write secret:NAME, secret:NAME:username or secret:NAME:version"
    )]
    NotAReference(String),
    #[error("`{0}`: a secret name is 1-128 letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("`{0}`: the field after the name must be value, password, username or version")]
    BadField(String),
    #[error(
        "secret `{0}` is not valid UTF-8 text, so it cannot go into an environment variable or template"
    )]
    NotText(String),
}

impl FromStr for SecretRef {
    type Err = SecretRefError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let rest = text
            .strip_prefix("secret:")
            .ok_or_else(|| SecretRefError::NotAReference(text.to_string()))?;
        let (name, field) = match rest.split_once(':') {
            Some((name, field)) => (name, Some(field)),
            None => (rest, None),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 128
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err(SecretRefError::BadName(text.to_string()));
        }
        let field = match field {
            None | Some("value") | Some("password") => SecretField::Value,
            Some("username") => SecretField::Username,
            Some("version") => SecretField::Version,
            Some(_) => return Err(SecretRefError::BadField(text.to_string())),
        };
        Ok(Self {
            name: name.to_string(),
            field,
        })
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = match self.field {
            SecretField::Value => "",
            SecretField::Username => ":username",
            SecretField::Version => ":version",
        };
        write!(f, "secret:{}{field}", self.name)
    }
}

impl SecretRef {
    /// This reference's field of `secret`, as text.
    pub fn resolve(&self, secret: &SecretView) -> Result<String, SecretRefError> {
        match self.field {
            SecretField::Value => String::from_utf8(secret.value.to_vec())
                .map_err(|_| SecretRefError::NotText(self.name.clone())),
            SecretField::Username => Ok(secret.username.clone()),
            SecretField::Version => Ok(secret.version.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_and_field() {
        let r: SecretRef = "secret:orders.db".parse().unwrap();
        assert_eq!(r.name, "orders.db");
        assert_eq!(r.field, SecretField::Value);
        let r: SecretRef = "secret:orders.db:username".parse().unwrap();
        assert_eq!(r.field, SecretField::Username);
        assert_eq!(r.to_string(), "secret:orders.db:username");
        assert_eq!(
            "secret:a:version".parse::<SecretRef>().unwrap().field,
            SecretField::Version
        );
    }

    #[test]
    fn refuses_what_is_not_a_reference() {
        assert!(matches!(
            "orders-db".parse::<SecretRef>(),
            Err(SecretRefError::NotAReference(_))
        ));
        assert!(matches!(
            "secret:".parse::<SecretRef>(),
            Err(SecretRefError::BadName(_))
        ));
        assert!(matches!(
            "secret:a b".parse::<SecretRef>(),
            Err(SecretRefError::BadName(_))
        ));
        assert!(matches!(
            "secret:a:pin".parse::<SecretRef>(),
            Err(SecretRefError::BadField(_))
        ));
    }
}
