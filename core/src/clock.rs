//! Calendar time in UTC without a date library: civil dates from Unix time
//! and back (Howard Hinnant's algorithms), for schedules and for providers'
//! RFC 3339 reset times.

/// A UTC date and time to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    /// 1–12.
    pub month: u32,
    /// 1–31.
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Sunday … 6 = Saturday, as in cron.
    pub weekday: u32,
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Civil {
    pub fn from_unix(secs: u64) -> Self {
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
            // 1970-01-01 was a Thursday.
            weekday: (days + 4).rem_euclid(7) as u32,
        }
    }

    pub fn now() -> Self {
        Self::from_unix(crate::now_ms() / 1000)
    }
}

/// Milliseconds since the epoch of an RFC 3339 UTC time such as
/// `2026-11-22T07:00:01Z` or `2026-11-22T07:00:01.5Z` (offsets other than
/// `Z` are refused).
pub fn rfc3339_ms(s: &str) -> Option<u64> {
    let s = s.trim().strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (hh, mm): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let secs: f64 = t.next()?.parse().ok()?;
    let ms = (days_from_civil(y, m, day) * 86_400 + hh * 3600 + mm * 60) * 1000 + (secs * 1000.0) as i64;
    u64::try_from(ms).ok()
}

/// A five-field cron expression (minute hour day-of-month month
/// day-of-week), matched against UTC. Fields take `*`, numbers, ranges
/// `a-b`, lists `a,b` and steps `*/n` or `a-b/n`; day-of-week 0 or 7 is
/// Sunday. As in cron, when both day fields are restricted either may match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    fields: [u64; 5],
    any_day_of_month: bool,
    any_day_of_week: bool,
}

const RANGES: [(u32, u32); 5] = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];
const NAMES: [&str; 5] = ["minute", "hour", "day of month", "month", "day of week"];

/// A cron expression that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("`{0}` needs five fields (minute hour day-of-month month day-of-week)")]
    Fields(String),
    #[error("{field} `{spec}`: {problem}")]
    Field { field: &'static str, spec: String, problem: FieldProblem },
}

/// What is wrong with one field of a cron expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldProblem {
    #[error("bad step `{0}`")]
    Step(String),
    #[error("a step must be at least 1")]
    ZeroStep,
    #[error("out of range {0}-{1}")]
    Range(u32, u32),
    #[error("`{0}` is not a number")]
    NotNumber(String),
}

impl Cron {
    pub fn parse(expr: &str) -> Result<Self, CronError> {
        let parts: Vec<&str> = expr.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(CronError::Fields(expr.to_owned()));
        }
        let mut fields = [0u64; 5];
        for (i, part) in parts.iter().enumerate() {
            fields[i] = field(part, RANGES[i]).map_err(|problem| CronError::Field {
                field: NAMES[i],
                spec: (*part).to_owned(),
                problem,
            })?;
        }
        // Sunday is 0 or 7.
        if fields[4] & (1 << 7) != 0 {
            fields[4] |= 1;
        }
        Ok(Self { fields, any_day_of_month: parts[2] == "*", any_day_of_week: parts[4] == "*" })
    }

    pub fn matches(&self, t: &Civil) -> bool {
        let has = |i: usize, v: u32| self.fields[i] & (1 << v) != 0;
        let dom = has(2, t.day);
        let dow = has(4, t.weekday);
        let day = match (self.any_day_of_month, self.any_day_of_week) {
            (false, false) => dom || dow,
            _ => dom && dow,
        };
        has(0, t.minute) && has(1, t.hour) && has(3, t.month) && day
    }
}

fn field(spec: &str, (lo, hi): (u32, u32)) -> Result<u64, FieldProblem> {
    let mut bits = 0u64;
    for item in spec.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().map_err(|_| FieldProblem::Step(s.to_owned()))?),
            None => (item, 1),
        };
        if step == 0 {
            return Err(FieldProblem::ZeroStep);
        }
        let (a, b) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None if step > 1 => (num(r)?, hi),
                None => (num(r)?, num(r)?),
            },
        };
        if a < lo || b > hi || a > b {
            return Err(FieldProblem::Range(lo, hi));
        }
        let mut v = a;
        while v <= b {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

fn num(s: &str) -> Result<u32, FieldProblem> {
    s.parse().map_err(|_| FieldProblem::NotNumber(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        let c = Civil::from_unix(1_795_330_801);
        assert_eq!((c.year, c.month, c.day, c.hour, c.minute, c.second), (2026, 11, 22, 7, 0, 1));
        assert_eq!(c.weekday, 0, "2026-11-22 is a Sunday");
        assert_eq!(Civil::from_unix(0).weekday, 4);
        assert_eq!(rfc3339_ms("2026-11-22T07:00:01.5Z"), Some(1_795_330_801_500));
        assert_eq!(rfc3339_ms("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(rfc3339_ms("2026-11-22T07:00:01+01:00"), None);
    }

    #[test]
    fn cron_windows_match() {
        let sunday_7am = Civil::from_unix(1_795_330_801);
        assert!(Cron::parse("* * * * *").unwrap().matches(&sunday_7am));
        assert!(Cron::parse("0-5 7 * * 0").unwrap().matches(&sunday_7am));
        assert!(Cron::parse("0-5 7 * * 7").unwrap().matches(&sunday_7am), "7 is Sunday too");
        assert!(!Cron::parse("* 8-17 * * 1-5").unwrap().matches(&sunday_7am));
        assert!(Cron::parse("*/15 6-8 22 11 *").unwrap().matches(&sunday_7am));
        assert!(!Cron::parse("*/7 * * * *").unwrap().matches(&Civil::from_unix(1_795_330_801 + 60)));
        assert!(Cron::parse("* * 1 * 0").unwrap().matches(&sunday_7am), "either restricted day field may match");
        assert!(Cron::parse("* * *").is_err());
        assert!(Cron::parse("61 * * * *").unwrap_err().to_string().contains("minute"));
        assert!(Cron::parse("*/0 * * * *").is_err());
    }
}
