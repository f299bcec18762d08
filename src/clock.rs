//! Wall-clock helpers shared by every stage.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The last millisecond of the year 9999.
const LAST_FOUR_DIGIT_YEAR_MS: i64 = 253_402_300_799_999;

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC, with the fraction of a
/// second only when there is one (`2026-01-01T00:00:00.5Z`).
///
/// Every record read has its arrival time formatted, so the years 1970–9999 are done by
/// hand, several times faster than a general formatter; the rest by aws-smithy-types.
pub fn rfc3339(millis: i64) -> String {
    if !(0..=LAST_FOUR_DIGIT_YEAR_MS).contains(&millis) {
        return aws_smithy_types::DateTime::from_millis(millis)
            .fmt(aws_smithy_types::date_time::Format::DateTime)
            .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned());
    }
    let (days, millis_of_day) = (millis / 86_400_000, millis % 86_400_000);
    let (year, month, day) = civil_from_days(days);
    let seconds = millis_of_day / 1000;
    let mut out = String::with_capacity(24);
    push_digits(&mut out, year, 4);
    out.push('-');
    push_digits(&mut out, month, 2);
    out.push('-');
    push_digits(&mut out, day, 2);
    out.push('T');
    push_digits(&mut out, seconds / 3600, 2);
    out.push(':');
    push_digits(&mut out, seconds / 60 % 60, 2);
    out.push(':');
    push_digits(&mut out, seconds % 60, 2);
    let mut fraction = millis_of_day % 1000;
    if fraction > 0 {
        out.push('.');
        let mut place = 100;
        while fraction > 0 {
            out.push(char::from(b'0' + (fraction / place) as u8));
            fraction %= place;
            place /= 10;
        }
    }
    out.push('Z');
    out
}

fn push_digits(out: &mut String, value: i64, width: u32) {
    for place in (0..width).rev() {
        out.push(char::from(b'0' + (value / 10_i64.pow(place) % 10) as u8));
    }
}

/// (year, month, day) of a day counted from 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    #[test]
    fn rfc3339_is_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            super::rfc3339(1_767_225_600_123),
            "2026-01-01T00:00:00.123Z"
        );
        assert_eq!(super::rfc3339(951_782_400_500), "2000-02-29T00:00:00.5Z");
    }

    proptest! {
        /// The hand-made formatter writes what aws-smithy-types writes, to the millisecond.
        #[test]
        fn rfc3339_matches_the_general_formatter(millis in 0..=super::LAST_FOUR_DIGIT_YEAR_MS) {
            let general = aws_smithy_types::DateTime::from_millis(millis)
                .fmt(aws_smithy_types::date_time::Format::DateTime)
                .unwrap();
            prop_assert_eq!(super::rfc3339(millis), general);
        }
    }
}
