<#
.SYNOPSIS
    Start odata-auth-proxy at logon with the Windows Task Scheduler (no administrator rights needed).

.DESCRIPTION
    Registers a scheduled task for the current user that runs

        %USERPROFILE%\.local\bin\odata-auth-proxy.exe run --config <Config>

    at logon, in your session (the proxy's console window shows its log; Ctrl+C or Ctrl+Break in it drains
    and stops the proxy), without a time limit. The config file is validated first, so a mistake is reported
    here and not in a task that stops at once.

    Reload after editing the config or replacing the key:   odata-auth-proxy reload --config <Config>
    Stop now:                                               Stop-ScheduledTask -TaskName odata-auth-proxy
    (Stop-ScheduledTask ends the process at once, without the drain; Ctrl+C in its window drains.)
    Remove:                                                 this script with -Unregister

.PARAMETER Config
    The proxy's YAML config file. Default: %APPDATA%\odata-auth-proxy\proxy.yaml

.PARAMETER TaskName
    Name of the scheduled task. Default: odata-auth-proxy

.PARAMETER Unregister
    Stop and remove the task instead.

.EXAMPLE
    powershell -NoProfile -ExecutionPolicy Bypass -File examples\workstation\register-task.ps1

.EXAMPLE
    powershell -NoProfile -ExecutionPolicy Bypass -File examples\workstation\register-task.ps1 -Unregister
#>
[CmdletBinding()]
param(
    [string]$Config = (Join-Path $env:APPDATA 'odata-auth-proxy\proxy.yaml'),
    [string]$TaskName = 'odata-auth-proxy',
    [switch]$Unregister
)
$ErrorActionPreference = 'Stop'

if ($Unregister) {
    Stop-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue
    Unregister-ScheduledTask -TaskName $TaskName -Confirm:$false
    Write-Host "removed the scheduled task $TaskName"
    return
}

$command = Get-Command odata-auth-proxy.exe -ErrorAction SilentlyContinue
if (-not $command) {
    throw "odata-auth-proxy.exe is not on PATH: install it with 'pipx install odata-auth-proxy' (or 'pipx install .' in the project folder), run 'pipx ensurepath' and open a new PowerShell window"
}
$exe = $command.Source
if (-not (Test-Path -LiteralPath $Config)) {
    throw "config file $Config not found: create it (README, section Windows) or pass -Config PATH"
}
$Config = (Resolve-Path -LiteralPath $Config).Path

& $exe config validate $Config
if ($LASTEXITCODE -ne 0) {
    throw "odata-auth-proxy config validate $Config failed (the line above says why); the task was not registered"
}

$user = "$env:USERDOMAIN\$env:USERNAME"
$action = New-ScheduledTaskAction -Execute $exe -Argument "run --config `"$Config`"" `
    -WorkingDirectory (Split-Path -Parent $Config)
$trigger = New-ScheduledTaskTrigger -AtLogOn -User $user
$principal = New-ScheduledTaskPrincipal -UserId $user -LogonType Interactive -RunLevel Limited
$settings = New-ScheduledTaskSettingsSet -ExecutionTimeLimit ([TimeSpan]::Zero) -MultipleInstances IgnoreNew `
    -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries -RestartCount 3 -RestartInterval (New-TimeSpan -Minutes 1)

Register-ScheduledTask -TaskName $TaskName -Action $action -Trigger $trigger -Principal $principal `
    -Settings $settings -Force `
    -Description 'odata-auth-proxy: adds OAuth client-credentials tokens to requests for SAP Cloud Integration OData APIs' |
    Out-Null
Start-ScheduledTask -TaskName $TaskName
Write-Host "registered and started the scheduled task $TaskName ($exe run --config `"$Config`"); it starts at every logon"
Write-Host "try: curl.exe 'http://127.0.0.1:8080/-/readyz'"
