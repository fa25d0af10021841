# Extract the `runcmd:` list of a #cloud-config document, one shell command
# per output line. Supported item forms:
#   - some shell command          (also "quoted" or 'quoted')
#   - [ prog, arg1, "arg 2" ]     (flow list, naive split on commas)
# Multi-line items and other YAML constructs are skipped.
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
function unquote(s) {
    if (length(s) >= 2 && ((s ~ /^".*"$/) || (s ~ /^'.*'$/)))
        s = substr(s, 2, length(s) - 2)
    return s
}
function shq(s) { gsub(/'/, "'\\''", s); return "'" s "'" }
{ sub(/\r$/, "") }
/^runcmd:[ \t]*$/ { inrun = 1; next }
inrun && /^[^ \t#-]/ { inrun = 0 }
inrun && /^[ \t]*-[ \t]/ {
    item = $0
    sub(/^[ \t]*-[ \t]+/, "", item)
    item = trim(item)
    if (item == "") next
    if (item ~ /^\[.*\]$/) {
        n = split(substr(item, 2, length(item) - 2), parts, ",")
        cmd = ""
        for (i = 1; i <= n; i++)
            cmd = cmd (i > 1 ? " " : "") shq(unquote(trim(parts[i])))
        print cmd
    } else if (item !~ /^[\[{|>]/) {
        print unquote(item)
    }
}
