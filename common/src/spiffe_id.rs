//! SPIFFE IDs and trust domains, parsed once at the edge. A `SpiffeId` or `TrustDomain`
//! that exists has already passed every rule of the SPIFFE ID spec, so code holding one
//! never re-checks a string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

const SCHEME_PREFIX: &str = "spiffe://";
const MAX_ID_BYTES: usize = 2048;
const MAX_TRUST_DOMAIN_BYTES: usize = 255;
/// Longer inputs are left out of error messages: they would drown the message and are
/// more likely to be attacker-supplied junk than a typo a user needs to see.
const MAX_SHOWN_INPUT_BYTES: usize = 100;

/// The name of a SPIFFE trust domain, such as `example.org`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain {
    name: String,
}

/// A SPIFFE ID, such as `spiffe://example.org/ns/prod/sa/web`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    // `full` comes first so the derived ordering is the ordering of the text form; the
    // other fields are derived from it and never disagree.
    full: String,
    trust_domain: TrustDomain,
    path_start: usize,
}

/// Why a string is not a SPIFFE ID or trust domain.
#[non_exhaustive]
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty; expected `spiffe://<trust-domain>/<path>`")]
    Empty,
    #[error("SPIFFE ID is {len} bytes long; the limit is {MAX_ID_BYTES} bytes")]
    TooLong { len: usize },
    #[error("SPIFFE ID must start with `spiffe://` (scheme `spiffe`, lowercase){input}")]
    WrongScheme { input: ShownInput },
    #[error("SPIFFE ID has no trust domain; expected `spiffe://<trust-domain>/<path>`{input}")]
    MissingTrustDomain { input: ShownInput },
    #[error("trust domain is {len} bytes long; the limit is {MAX_TRUST_DOMAIN_BYTES} bytes")]
    TrustDomainTooLong { len: usize },
    #[error("trust domain must be lowercase; uppercase letters are not folded{input}")]
    TrustDomainUppercase { input: ShownInput },
    #[error("trust domain must not include a port (`:<port>`){input}")]
    TrustDomainPort { input: ShownInput },
    #[error("trust domain must not include user info (`<user>@`){input}")]
    TrustDomainUserinfo { input: ShownInput },
    #[error(
        "trust domain contains {found:?}; only lowercase letters, digits, `.`, `-` and `_` are allowed{input}"
    )]
    TrustDomainBadChar { found: char, input: ShownInput },
    #[error(
        "a trust domain is a bare name and has no path; remove everything after the name{input}"
    )]
    TrustDomainHasPath { input: ShownInput },
    #[error("SPIFFE ID path must be empty or start with `/`{input}")]
    PathNotAbsolute { input: ShownInput },
    #[error("SPIFFE ID path must not contain an empty segment (`//`){input}")]
    EmptySegment { input: ShownInput },
    #[error("SPIFFE ID path must not contain `.` or `..` segments{input}")]
    DotSegment { input: ShownInput },
    #[error("SPIFFE ID path must not end with `/`{input}")]
    TrailingSlash { input: ShownInput },
    #[error("SPIFFE ID must not contain percent-encoding (`%`){input}")]
    PercentEncoding { input: ShownInput },
    #[error("SPIFFE ID must not contain a query (`?`){input}")]
    Query { input: ShownInput },
    #[error("SPIFFE ID must not contain a fragment (`#`){input}")]
    Fragment { input: ShownInput },
    #[error(
        "SPIFFE ID path contains {found:?}; path segments allow only letters, digits, `.`, `-` and `_`{input}"
    )]
    PathBadChar { found: char, input: ShownInput },
}

/// The offending input of an error, kept only when it is short and printable ASCII, so an
/// error message can never carry a wall of text or terminal control sequences.
/// Displays as a `: ` followed by the quoted input, or as nothing when withheld.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShownInput(Option<String>);

impl TrustDomain {
    /// Parses `example.org` or `spiffe://example.org`.
    pub fn new(input: &str) -> Result<Self, SpiffeIdError> {
        if input.contains("://") {
            let id = SpiffeId::parse(input)?;
            if id.has_path() {
                return Err(SpiffeIdError::TrustDomainHasPath {
                    input: ShownInput::new(input),
                });
            }
            return Ok(id.trust_domain);
        }
        check_uri_marks(input, input)?;
        if input.contains('/') {
            return Err(SpiffeIdError::TrustDomainHasPath {
                input: ShownInput::new(input),
            });
        }
        check_trust_domain(input, input)?;
        Ok(Self {
            name: input.to_owned(),
        })
    }

    /// The bare name, without scheme.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The SPIFFE ID of the trust domain itself (`spiffe://<name>`), as carried by CA
    /// certificates.
    pub fn id(&self) -> SpiffeId {
        SpiffeId::assemble(self.clone(), "")
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TrustDomain").field(&self.name).finish()
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for TrustDomain {
    type Error = SpiffeIdError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> Self {
        td.name
    }
}

impl SpiffeId {
    /// Parses `spiffe://<trust-domain>[/<path>]`.
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if input.len() > MAX_ID_BYTES {
            return Err(SpiffeIdError::TooLong { len: input.len() });
        }
        let shown = || ShownInput::new(input);
        let Some(rest) = input.strip_prefix(SCHEME_PREFIX) else {
            return Err(SpiffeIdError::WrongScheme { input: shown() });
        };
        check_uri_marks(rest, input)?;
        let (name, path) = rest.find('/').map_or((rest, ""), |at| rest.split_at(at));
        check_trust_domain(name, input)?;
        check_path(path, input)?;
        Ok(Self::assemble(
            TrustDomain {
                name: name.to_owned(),
            },
            path,
        ))
    }

    /// Builds the ID `spiffe://<trust_domain><path>`; `path` is empty or starts with `/`.
    pub fn from_parts(trust_domain: &TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        let len = SCHEME_PREFIX.len() + trust_domain.name.len() + path.len();
        if len > MAX_ID_BYTES {
            return Err(SpiffeIdError::TooLong { len });
        }
        if !path.is_empty() && !path.starts_with('/') {
            return Err(SpiffeIdError::PathNotAbsolute {
                input: ShownInput::new(path),
            });
        }
        check_uri_marks(path, path)?;
        check_path(path, path)?;
        Ok(Self::assemble(trust_domain.clone(), path))
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path including its leading `/`, or `""` for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.full[self.path_start..]
    }

    pub fn is_member_of(&self, trust_domain: &TrustDomain) -> bool {
        self.trust_domain == *trust_domain
    }

    /// Leaf SVIDs need a path; CA certificates carry an ID without one.
    pub fn has_path(&self) -> bool {
        self.path_start < self.full.len()
    }

    /// The full text form, `spiffe://<trust-domain><path>`.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// Joins parts that have already been checked.
    fn assemble(trust_domain: TrustDomain, path: &str) -> Self {
        let full = format!("{SCHEME_PREFIX}{}{path}", trust_domain.name);
        let path_start = full.len() - path.len();
        Self {
            full,
            trust_domain,
            path_start,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SpiffeId").field(&self.full).finish()
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.full
    }
}

impl ShownInput {
    pub fn new(input: &str) -> Self {
        let safe = input.len() <= MAX_SHOWN_INPUT_BYTES
            && input.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        Self(safe.then(|| input.to_owned()))
    }

    /// The input, if it was short and safe enough to keep.
    pub fn as_str(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl fmt::Display for ShownInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(input) => write!(f, ": `{input}`"),
            None => Ok(()),
        }
    }
}

/// Query, fragment and percent-encoding are named as such wherever they appear, rather
/// than reported as a stray character of the trust domain or path, because the fix the
/// user needs is different. `input` is what the user gave, for the error message.
fn check_uri_marks(text: &str, input: &str) -> Result<(), SpiffeIdError> {
    let shown = || ShownInput::new(input);
    if text.contains('?') {
        return Err(SpiffeIdError::Query { input: shown() });
    }
    if text.contains('#') {
        return Err(SpiffeIdError::Fragment { input: shown() });
    }
    if text.contains('%') {
        return Err(SpiffeIdError::PercentEncoding { input: shown() });
    }
    Ok(())
}

/// Checks a bare trust domain name; the caller has already ruled out `/`, `?`, `#`, `%`.
fn check_trust_domain(name: &str, input: &str) -> Result<(), SpiffeIdError> {
    let shown = || ShownInput::new(input);
    if name.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain { input: shown() });
    }
    if name.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err(SpiffeIdError::TrustDomainTooLong { len: name.len() });
    }
    // `@` before `:` so that `user:password@host` is reported as user info, not a port.
    if name.contains('@') {
        return Err(SpiffeIdError::TrustDomainUserinfo { input: shown() });
    }
    if name.contains(':') {
        return Err(SpiffeIdError::TrustDomainPort { input: shown() });
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(SpiffeIdError::TrustDomainUppercase { input: shown() });
    }
    match name
        .chars()
        .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        Some(found) => Err(SpiffeIdError::TrustDomainBadChar {
            found,
            input: shown(),
        }),
        None => Ok(()),
    }
}

/// Checks a path that is empty or starts with `/` and is free of `?`, `#` and `%`.
/// `input` is what the user gave, for the error message.
fn check_path(path: &str, input: &str) -> Result<(), SpiffeIdError> {
    let Some(segments) = path.strip_prefix('/') else {
        return Ok(());
    };
    let shown = || ShownInput::new(input);
    let mut segments = segments.split('/').peekable();
    while let Some(segment) = segments.next() {
        if segment.is_empty() {
            return Err(if segments.peek().is_none() {
                SpiffeIdError::TrailingSlash { input: shown() }
            } else {
                SpiffeIdError::EmptySegment { input: shown() }
            });
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment { input: shown() });
        }
        if let Some(found) = segment
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(SpiffeIdError::PathBadChar {
                found,
                input: shown(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error as DeError, StrDeserializer};

    use super::*;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn err(input: &str) -> SpiffeIdError {
        SpiffeId::parse(input).unwrap_err()
    }

    #[test]
    fn parses_id_with_path() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
        assert_eq!(id.trust_domain(), &td("example.org"));
        assert_eq!(id.path(), "/ns/prod/sa/web");
        assert!(id.has_path());
        assert_eq!(id.as_str(), "spiffe://example.org/ns/prod/sa/web");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/prod/sa/web");
        assert!(id.is_member_of(&td("example.org")));
        assert!(!id.is_member_of(&td("example.com")));
    }

    #[test]
    fn parses_id_without_path() {
        let id = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!(id.path(), "");
        assert!(!id.has_path());
        assert_eq!(id, td("example.org").id());
    }

    #[test]
    fn path_allows_mixed_case_and_punctuation() {
        let id = SpiffeId::parse("spiffe://a-b_c.9/Web-1/x_y/.hidden/a..b").unwrap();
        assert_eq!(id.path(), "/Web-1/x_y/.hidden/a..b");
    }

    #[test]
    fn trust_domain_accepts_bare_and_uri_forms() {
        assert_eq!(td("example.org").as_str(), "example.org");
        assert_eq!(td("spiffe://example.org"), td("example.org"));
        assert_eq!(td("example.org").to_string(), "example.org");
        assert_eq!(td("example.org").id().as_str(), "spiffe://example.org");
        assert_eq!(
            "example.org".parse::<TrustDomain>().unwrap(),
            td("example.org")
        );
    }

    #[test]
    fn trust_domain_rejects_a_path() {
        assert!(matches!(
            TrustDomain::new("spiffe://example.org/web"),
            Err(SpiffeIdError::TrustDomainHasPath { .. })
        ));
        assert!(matches!(
            TrustDomain::new("example.org/web"),
            Err(SpiffeIdError::TrustDomainHasPath { .. })
        ));
    }

    #[test]
    fn trust_domain_rejects_each_rule() {
        assert_eq!(
            TrustDomain::new(""),
            Err(SpiffeIdError::MissingTrustDomain {
                input: ShownInput::new("")
            })
        );
        assert!(matches!(
            TrustDomain::new("Example.org"),
            Err(SpiffeIdError::TrustDomainUppercase { .. })
        ));
        assert!(matches!(
            TrustDomain::new("example.org:443"),
            Err(SpiffeIdError::TrustDomainPort { .. })
        ));
        assert!(matches!(
            TrustDomain::new("me@example.org"),
            Err(SpiffeIdError::TrustDomainUserinfo { .. })
        ));
        assert!(matches!(
            TrustDomain::new("exa mple.org"),
            Err(SpiffeIdError::TrustDomainBadChar { found: ' ', .. })
        ));
        assert!(matches!(
            TrustDomain::new("example.org?x"),
            Err(SpiffeIdError::Query { .. })
        ));
        assert!(matches!(
            TrustDomain::new("https://example.org"),
            Err(SpiffeIdError::WrongScheme { .. })
        ));
        assert_eq!(
            TrustDomain::new(&"a".repeat(256)),
            Err(SpiffeIdError::TrustDomainTooLong { len: 256 })
        );
        assert!(TrustDomain::new(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(err(""), SpiffeIdError::Empty);
    }

    #[test]
    fn rejects_wrong_scheme() {
        for input in [
            "SPIFFE://example.org/web",
            "Spiffe://example.org/web",
            "https://example.org/web",
            "spiffe:/example.org/web",
            "spiffe:example.org",
            "example.org/web",
            " spiffe://example.org/web",
        ] {
            assert!(
                matches!(err(input), SpiffeIdError::WrongScheme { .. }),
                "{input}"
            );
        }
    }

    #[test]
    fn rejects_missing_trust_domain() {
        assert!(matches!(
            err("spiffe://"),
            SpiffeIdError::MissingTrustDomain { .. }
        ));
        assert!(matches!(
            err("spiffe:///web"),
            SpiffeIdError::MissingTrustDomain { .. }
        ));
    }

    #[test]
    fn rejects_uppercase_trust_domain_instead_of_folding() {
        assert!(matches!(
            err("spiffe://Example.org/web"),
            SpiffeIdError::TrustDomainUppercase { .. }
        ));
    }

    #[test]
    fn rejects_port_and_userinfo() {
        assert!(matches!(
            err("spiffe://example.org:8443/web"),
            SpiffeIdError::TrustDomainPort { .. }
        ));
        assert!(matches!(
            err("spiffe://user@example.org/web"),
            SpiffeIdError::TrustDomainUserinfo { .. }
        ));
        assert!(matches!(
            err("spiffe://user:secret@example.org/web"),
            SpiffeIdError::TrustDomainUserinfo { .. }
        ));
    }

    #[test]
    fn rejects_bad_trust_domain_char() {
        assert!(matches!(
            err("spiffe://exa+mple.org/web"),
            SpiffeIdError::TrustDomainBadChar { found: '+', .. }
        ));
        assert!(matches!(
            err("spiffe://exämple.org/web"),
            SpiffeIdError::TrustDomainBadChar { found: 'ä', .. }
        ));
    }

    #[test]
    fn trust_domain_length_limit_is_255_bytes() {
        let ok = format!("spiffe://{}/web", "a".repeat(255));
        assert!(SpiffeId::parse(&ok).is_ok());
        let long = format!("spiffe://{}/web", "a".repeat(256));
        assert_eq!(err(&long), SpiffeIdError::TrustDomainTooLong { len: 256 });
    }

    #[test]
    fn rejects_bad_path_segments() {
        for (input, want) in [
            ("spiffe://example.org//web", "empty"),
            ("spiffe://example.org/a//b", "empty"),
            ("spiffe://example.org/.", "dot"),
            ("spiffe://example.org/a/../b", "dot"),
            ("spiffe://example.org/", "trailing"),
            ("spiffe://example.org/web/", "trailing"),
            ("spiffe://example.org/w%65b", "percent"),
            ("spiffe://example.org/web?x=1", "query"),
            ("spiffe://example.org/web#top", "fragment"),
            ("spiffe://example.org/w eb", "char"),
            ("spiffe://example.org/w+eb", "char"),
        ] {
            let got = err(input);
            let ok = match want {
                "empty" => matches!(got, SpiffeIdError::EmptySegment { .. }),
                "dot" => matches!(got, SpiffeIdError::DotSegment { .. }),
                "trailing" => matches!(got, SpiffeIdError::TrailingSlash { .. }),
                "percent" => matches!(got, SpiffeIdError::PercentEncoding { .. }),
                "query" => matches!(got, SpiffeIdError::Query { .. }),
                "fragment" => matches!(got, SpiffeIdError::Fragment { .. }),
                _ => matches!(got, SpiffeIdError::PathBadChar { .. }),
            };
            assert!(ok, "{input}: got {got:?}");
        }
    }

    #[test]
    fn whole_id_length_limit_is_2048_bytes() {
        let prefix = "spiffe://example.org/";
        let ok = format!("{prefix}{}", "a".repeat(MAX_ID_BYTES - prefix.len()));
        assert!(SpiffeId::parse(&ok).is_ok());
        let long = format!("{ok}a");
        assert_eq!(err(&long), SpiffeIdError::TooLong { len: 2049 });
    }

    #[test]
    fn from_parts_builds_and_checks_the_path() {
        let domain = td("example.org");
        let id = SpiffeId::from_parts(&domain, "/ns/web").unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/ns/web");
        assert_eq!(SpiffeId::from_parts(&domain, "").unwrap(), domain.id());
        assert!(matches!(
            SpiffeId::from_parts(&domain, "web"),
            Err(SpiffeIdError::PathNotAbsolute { .. })
        ));
        assert!(matches!(
            SpiffeId::from_parts(&domain, "/web/"),
            Err(SpiffeIdError::TrailingSlash { .. })
        ));
        assert!(matches!(
            SpiffeId::from_parts(&domain, "/web?x"),
            Err(SpiffeIdError::Query { .. })
        ));
        assert!(matches!(
            SpiffeId::from_parts(&domain, &format!("/{}", "a".repeat(MAX_ID_BYTES))),
            Err(SpiffeIdError::TooLong { .. })
        ));
    }

    #[test]
    fn error_messages_name_the_rule_and_show_short_safe_input() {
        assert_eq!(
            err("spiffe://example.org/web/").to_string(),
            "SPIFFE ID path must not end with `/`: `spiffe://example.org/web/`"
        );
        assert_eq!(
            err("spiffe://Example.org").to_string(),
            "trust domain must be lowercase; uppercase letters are not folded: `spiffe://Example.org`"
        );
        // A control character is named escaped, and the input holding it is withheld.
        assert_eq!(
            err("spiffe://example.org/a\u{1b}[2J").to_string(),
            "SPIFFE ID path contains '\\u{1b}'; path segments allow only letters, digits, `.`, `-` and `_`"
        );
        let long = format!("spiffe://example.org/{}/", "a".repeat(200));
        assert_eq!(
            err(&long).to_string(),
            "SPIFFE ID path must not end with `/`"
        );
    }

    #[test]
    fn serde_deserialize_validates() {
        let de: StrDeserializer<'_, DeError> = "spiffe://example.org/web".into_deserializer();
        assert_eq!(
            SpiffeId::deserialize(de).unwrap(),
            SpiffeId::parse("spiffe://example.org/web").unwrap()
        );
        let de: StrDeserializer<'_, DeError> = "spiffe://example.org/web/".into_deserializer();
        let error = SpiffeId::deserialize(de).unwrap_err();
        assert!(
            error.to_string().contains("must not end with `/`"),
            "{error}"
        );

        let de: StrDeserializer<'_, DeError> = "example.org".into_deserializer();
        assert_eq!(TrustDomain::deserialize(de).unwrap(), td("example.org"));
        let de: StrDeserializer<'_, DeError> = "Example.org".into_deserializer();
        assert!(TrustDomain::deserialize(de).is_err());
    }

    #[test]
    fn serde_form_is_the_text_form() {
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        assert_eq!(String::from(id.clone()), "spiffe://example.org/web");
        assert_eq!(String::from(id.trust_domain().clone()), "example.org");
    }

    // --- property tests ---

    fn trust_domain_name() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,40}"
    }

    fn segment() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,16}".prop_filter("dot segments are invalid", |s| s != "." && s != "..")
    }

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(segment(), 0..6)
            .prop_map(|segments| segments.iter().map(|s| format!("/{s}")).collect())
    }

    #[derive(Debug, Clone, Copy)]
    enum Violation {
        Scheme,
        UppercaseTrustDomain,
        Port,
        Userinfo,
        EmptySegment,
        DotSegment,
        DotDotSegment,
        TrailingSlash,
        Percent,
        Query,
        Fragment,
        TrustDomainChar,
        PathChar,
        TrustDomainTooLong,
        TooLong,
    }

    const VIOLATIONS: [Violation; 15] = [
        Violation::Scheme,
        Violation::UppercaseTrustDomain,
        Violation::Port,
        Violation::Userinfo,
        Violation::EmptySegment,
        Violation::DotSegment,
        Violation::DotDotSegment,
        Violation::TrailingSlash,
        Violation::Percent,
        Violation::Query,
        Violation::Fragment,
        Violation::TrustDomainChar,
        Violation::PathChar,
        Violation::TrustDomainTooLong,
        Violation::TooLong,
    ];

    /// Characters that break no rule other than "not in the allowed set".
    fn stray_char(allowed: fn(char) -> bool) -> impl Strategy<Value = char> {
        any::<char>().prop_filter("must be a plain bad character", move |&c| {
            !allowed(c) && !c.is_ascii_uppercase() && !"/?#%:@".contains(c)
        })
    }

    /// Builds an ID from valid parts with exactly one rule broken.
    fn invalid_id() -> impl Strategy<Value = (Violation, String)> {
        (
            prop::sample::select(&VIOLATIONS[..]),
            trust_domain_name(),
            path(),
            segment(),
            "[a-z][a-z0-9+.-]{0,8}".prop_filter("must differ", |s| s != "spiffe"),
            0usize..40,
            stray_char(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)),
            stray_char(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
        )
            .prop_map(
                |(violation, name, path, seg, scheme, at, td_char, path_char)| {
                    let at = at % (name.len() + 1);
                    let id = match violation {
                        Violation::Scheme => {
                            let scheme = if at % 2 == 0 {
                                "SPIFFE".to_owned()
                            } else {
                                scheme
                            };
                            format!("{scheme}://{name}{path}")
                        }
                        Violation::UppercaseTrustDomain => {
                            format!("spiffe://{}X{}{path}", &name[..at], &name[at..])
                        }
                        Violation::Port => format!("spiffe://{name}:{}{path}", at + 1),
                        Violation::Userinfo => {
                            format!("spiffe://{}@{name}{path}", seg.to_lowercase())
                        }
                        Violation::EmptySegment => format!("spiffe://{name}{path}//{seg}"),
                        Violation::DotSegment => format!("spiffe://{name}{path}/./{seg}"),
                        Violation::DotDotSegment => format!("spiffe://{name}/{seg}/..{path}"),
                        Violation::TrailingSlash => format!("spiffe://{name}{path}/"),
                        Violation::Percent => format!("spiffe://{name}{path}/%2F{seg}"),
                        Violation::Query => format!("spiffe://{name}{path}?{seg}"),
                        Violation::Fragment => format!("spiffe://{name}{path}#{seg}"),
                        Violation::TrustDomainChar => {
                            format!("spiffe://{}{td_char}{}{path}", &name[..at], &name[at..])
                        }
                        Violation::PathChar => format!("spiffe://{name}{path}/{seg}{path_char}"),
                        Violation::TrustDomainTooLong => {
                            format!("spiffe://{}{path}", name.repeat(256 / name.len() + 1))
                        }
                        Violation::TooLong => {
                            let long = format!("/{seg}").repeat(MAX_ID_BYTES / (seg.len() + 1) + 1);
                            format!("spiffe://{name}{path}{long}")
                        }
                    };
                    (violation, id)
                },
            )
    }

    fn is_expected(violation: Violation, error: &SpiffeIdError) -> bool {
        use SpiffeIdError as E;
        match violation {
            Violation::Scheme => matches!(error, E::WrongScheme { .. }),
            Violation::UppercaseTrustDomain => matches!(error, E::TrustDomainUppercase { .. }),
            Violation::Port => matches!(error, E::TrustDomainPort { .. }),
            Violation::Userinfo => matches!(error, E::TrustDomainUserinfo { .. }),
            Violation::EmptySegment => matches!(error, E::EmptySegment { .. }),
            Violation::DotSegment | Violation::DotDotSegment => {
                matches!(error, E::DotSegment { .. })
            }
            Violation::TrailingSlash => matches!(error, E::TrailingSlash { .. }),
            Violation::Percent => matches!(error, E::PercentEncoding { .. }),
            Violation::Query => matches!(error, E::Query { .. }),
            Violation::Fragment => matches!(error, E::Fragment { .. }),
            Violation::TrustDomainChar => matches!(error, E::TrustDomainBadChar { .. }),
            Violation::PathChar => matches!(error, E::PathBadChar { .. }),
            Violation::TrustDomainTooLong => matches!(error, E::TrustDomainTooLong { .. }),
            Violation::TooLong => matches!(error, E::TooLong { .. }),
        }
    }

    proptest! {
        #[test]
        fn valid_ids_parse_and_round_trip(name in trust_domain_name(), path in path()) {
            let text = format!("spiffe://{name}{path}");
            let id = SpiffeId::parse(&text).unwrap();
            prop_assert_eq!(id.to_string(), text.clone());
            prop_assert_eq!(id.trust_domain().as_str(), name.as_str());
            prop_assert_eq!(id.path(), path.as_str());
            prop_assert_eq!(id.has_path(), !path.is_empty());
            prop_assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id.clone());
            let domain = TrustDomain::new(&name).unwrap();
            prop_assert_eq!(SpiffeId::from_parts(&domain, &path).unwrap(), id.clone());
            prop_assert!(id.is_member_of(&domain));
            prop_assert_eq!(TrustDomain::new(&domain.id().to_string()).unwrap(), domain);
        }

        #[test]
        fn invalid_ids_fail_with_the_matching_error((violation, text) in invalid_id()) {
            let error = SpiffeId::parse(&text).unwrap_err();
            prop_assert!(
                is_expected(violation, &error),
                "{:?} in {:?} gave {:?}", violation, text, error
            );
        }
    }
}
