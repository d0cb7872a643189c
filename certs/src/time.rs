//! Time as fedmesh writes it: Unix seconds in documents, RFC 3339 (UTC, whole seconds) for
//! people. The one place that converts between `SystemTime`, Unix seconds, RFC 3339 text and
//! the time types of the X.509 and TLS libraries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Unix seconds of `t` (0 before 1970).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// The time `secs` Unix seconds after the epoch (saturating far in the future).
pub fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or_else(|| UNIX_EPOCH + Duration::from_secs(i64::MAX.unsigned_abs()))
}

/// `t` as RFC 3339 in UTC, to the second: `2030-01-01T00:00:00Z` (`@<secs>` for a time RFC 3339
/// cannot write).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = unix(t);
    rfc3339_unix(secs).unwrap_or_else(|| format!("@{secs}"))
}

/// Unix seconds `secs` as RFC 3339 in UTC, when the time can be written so (years 1970-9999).
pub fn rfc3339_unix(secs: u64) -> Option<String> {
    let t = OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    t.format(&Rfc3339).ok()
}

/// Parses an RFC 3339 time into Unix seconds (not before 1970).
pub fn parse_rfc3339(s: &str) -> Result<u64, String> {
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time like 2099-01-01T00:00:00Z ({e})"))?;
    u64::try_from(t.unix_timestamp()).map_err(|_| "is before 1970".to_owned())
}

pub(crate) fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// An X.509 timestamp (signed Unix seconds) as a `SystemTime`.
pub(crate) fn from_x509(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

pub(crate) fn unix_time(t: SystemTime) -> rustls_pki_types::UnixTime {
    rustls_pki_types::UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_whole_seconds() {
        let t = from_unix(1_893_456_000);
        assert_eq!(rfc3339(t), "2030-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(t + Duration::from_millis(999)),
            "2030-01-01T00:00:00Z"
        );
        assert_eq!(rfc3339_unix(1_893_456_000).unwrap(), "2030-01-01T00:00:00Z");
        assert_eq!(rfc3339_unix(u64::MAX), None);
        assert_eq!(rfc3339(from_unix(u64::MAX)), format!("@{}", i64::MAX));
        assert_eq!(parse_rfc3339("2030-01-01T00:00:00Z"), Ok(1_893_456_000));
        assert_eq!(unix(t), 1_893_456_000);
        assert_eq!(unix(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert!(
            parse_rfc3339("1969-12-31T23:59:59Z")
                .unwrap_err()
                .contains("1970")
        );
        assert!(parse_rfc3339("tomorrow").unwrap_err().contains("RFC 3339"));
    }
}
