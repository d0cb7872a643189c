//! When to renew a certificate: at two thirds of its lifetime.

use std::time::SystemTime;

/// The moment a certificate valid from `not_before` to `not_after` should be renewed.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_before + lifetime * 2 / 3
}

/// Whether a certificate valid from `not_before` to `not_after` should be renewed at `now`.
pub fn needs_renewal(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    now >= renew_at(not_before, not_after)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn renews_at_two_thirds() {
        let nb = UNIX_EPOCH + Duration::from_secs(1_000);
        let na = nb + Duration::from_secs(24 * 3600);
        assert_eq!(renew_at(nb, na), nb + Duration::from_secs(16 * 3600));
        assert!(!needs_renewal(
            nb,
            na,
            nb + Duration::from_secs(16 * 3600 - 1)
        ));
        assert!(needs_renewal(nb, na, nb + Duration::from_secs(16 * 3600)));
        // A backwards validity never asks to wait.
        assert!(needs_renewal(na, nb, na));
    }
}
