//! Wall-clock timestamps in the contract's `ts` format.
//!
//! `ts` is `YYYY-MM-DDTHH:MM:SS.mmmZ`: UTC, milliseconds, always 24 bytes. Formatting is a pure
//! function of a Unix time in milliseconds so it can be tested without a clock; [`now_ms`] and
//! [`now_secs`] are the only functions here that read the clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Length in bytes of a formatted `ts`.
pub const TS_LEN: usize = 24;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

/// Formats `unix_ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
///
/// Years past 9999 are clamped to 9999-12-31T23:59:59.999Z so the output length never changes.
pub fn format_ts(unix_ms: u64) -> [u8; TS_LEN] {
    const MAX_MS: u64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let ms = unix_ms.min(MAX_MS);
    let secs = ms / 1000;
    let millis = (ms % 1000) as u32;
    let days = (secs / 86_400) as i64;
    let sod = (secs % 86_400) as u32;
    let (y, m, d) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut out[0..4], y as u32);
    put_digits(&mut out[5..7], m);
    put_digits(&mut out[8..10], d);
    put_digits(&mut out[11..13], sod / 3600);
    put_digits(&mut out[14..16], (sod / 60) % 60);
    put_digits(&mut out[17..19], sod % 60);
    put_digits(&mut out[20..23], millis);
    out
}

fn put_digits(dst: &mut [u8], mut v: u32) {
    for b in dst.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(ms: u64) -> String {
        String::from_utf8(format_ts(ms).to_vec()).unwrap()
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(ts(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(ts(1_705_312_800_000), "2024-01-15T10:00:00.000Z");
        assert_eq!(ts(1_705_312_805_007), "2024-01-15T10:00:05.007Z");
        assert_eq!(ts(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(ts(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
        assert_eq!(ts(u64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn every_day_of_four_centuries_round_trips_month_lengths() {
        // Walk day by day and check the date advances the way the calendar does.
        let mut prev = civil_from_days(0);
        for day in 1..(400 * 366) {
            let cur = civil_from_days(day);
            let same_month = cur.0 == prev.0 && cur.1 == prev.1 && cur.2 == prev.2 + 1;
            let next_month = cur.2 == 1
                && ((cur.1 == prev.1 + 1 && cur.0 == prev.0)
                    || (cur.1 == 1 && prev.1 == 12 && cur.0 == prev.0 + 1));
            assert!(same_month || next_month, "{prev:?} -> {cur:?}");
            prev = cur;
        }
    }
}
