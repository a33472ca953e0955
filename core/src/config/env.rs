//! The `SLUICE__SECTION__KEY` environment layer: setting a value at a
//! path of the TOML tree, creating tables and list entries on the way.

/// An env value as TOML would read it (`42`, `true`, `1.5`), else a string.
pub(super) fn env_value(raw: &str) -> toml::Value {
    if let Ok(v) = raw.parse::<i64>() {
        return toml::Value::Integer(v);
    }
    if let Ok(v) = raw.parse::<bool>() {
        return toml::Value::Boolean(v);
    }
    if let Ok(v) = raw.parse::<f64>()
        && raw.contains('.')
    {
        return toml::Value::Float(v);
    }
    toml::Value::String(raw.to_owned())
}

pub(super) fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((head, rest)) = path.split_first() else {
        return Err("empty key".into());
    };
    if rest.is_empty() {
        table.insert(head.clone(), value);
        return Ok(());
    }
    let slot = table.entry(head.clone()).or_insert_with(|| {
        if rest[0].parse::<usize>().is_ok() {
            toml::Value::Array(Vec::new())
        } else {
            toml::Value::Table(toml::Table::new())
        }
    });
    set_in_value(slot, rest, value)
}

fn set_in_value(slot: &mut toml::Value, path: &[String], value: toml::Value) -> Result<(), String> {
    match slot {
        toml::Value::Table(t) => set_path(t, path, value),
        toml::Value::Array(items) => {
            let index: usize = path[0].parse().map_err(|_| format!("`{}` is not a list index", path[0]))?;
            if index > items.len() {
                return Err(format!("list index {index} skips entries (list has {})", items.len()));
            }
            if index == items.len() {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            let rest = &path[1..];
            if rest.is_empty() {
                items[index] = value;
                return Ok(());
            }
            set_in_value(&mut items[index], rest, value)
        }
        _ => Err("a plain value cannot hold nested keys".into()),
    }
}
